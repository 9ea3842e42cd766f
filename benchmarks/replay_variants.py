"""Variants of a replay run's starting memory (config options changed), scored by replay on its training recordings.

Each ``--variant`` is a comma-separated list of ``NAMMConfig`` fields to change (``sinks=4``, ``head_cap=1.5``;
``base`` for none); every variant keeps the run's starting parameters (the depth allocation made uniform), and is
replayed on the run's first-stage recordings (``namm.evolution.replay``; the run's ``replay/`` folder, recording
any that is missing). Prints each sample's soft-greedy-prefix score against the full cache's, the means by task
and needle half, and paired differences against the first variant with a 95% bootstrap interval.

    python benchmarks/replay_variants.py runs/smollm2-replay --variant base --variant sinks=4
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
import yaml
from _replay_scoring import print_means, score_recordings

from namm.evolution.lm import margin_score
from namm.evolution.recipe import load_recipe
from namm.evolution.replay import ReplayEvaluator, replay
from namm.memory import NAMM
from namm.memory.bam import flatten, unflatten
from namm.stats import mean_difference


def variant(text: str) -> dict:
    """``"sinks=4,head_cap=1.5"`` -> ``{"sinks": 4, "head_cap": 1.5}`` (YAML values); ``"base"`` -> ``{}``."""
    if text == "base":
        return {}
    return {k.strip(): yaml.safe_load(v) for k, v in (item.split("=", 1) for item in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a replay run directory (its recipe.yaml and replay/ recordings)")
    ap.add_argument("--variant", action="append", required=True, help="config changes, e.g. sinks=4; or base")
    ap.add_argument("--samples", type=int, default=12, help="training samples per task (t0 ..)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(f"{args.run}/recipe.yaml")
    ev = ReplayEvaluator(recipe, args.run)
    named = unflatten(torch.as_tensor(ev.full_params(ev.initial_params())), ev.policy.config)
    if "depth_logits" in named:
        named["depth_logits"].zero_()
    params = flatten(named, ev.policy.config).float()
    policies = [NAMM(dataclasses.replace(ev.policy.config, **variant(v)), params=params) for v in args.variant]

    def score(rec):
        return [margin_score(replay(ev.model, p, rec, recipe.delay, recipe.chunk_size, recipe.replay_recompute)[0],
                             rec.full_margins)[0] for p in policies]

    scores = score_recordings(ev, args.samples, score)
    print("\nvariants: " + " | ".join(args.variant))
    print_means(scores)
    tasks = sorted({t for t, _ in scores})
    for j in range(1, len(policies)):
        groups = [np.array([[s[j], s[0]] for (t, _), (_, s) in scores.items() if t == task]) for task in tasks]
        print(f"{args.variant[j]} minus {args.variant[0]}: {mean_difference(groups)} (mean over tasks, paired)")


if __name__ == "__main__":
    main()
