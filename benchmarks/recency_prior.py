"""A recency prior on the shipped rule, scored by replay on a replay run's training recordings.

The shipped memory ranks tokens by their reconstruction score alone. This adds ``-c x sin(age / 3344)`` (the
slowest sine of the age code, ``head_weight[3]``: 0 for the newest token, about ``-0.57 c`` nats at age 2k) for
each ``c`` and replays every recording of the run's first stage (``namm.evolution.replay``; one member per ``c``,
the depth allocation uniform), printing each sample's soft-greedy-prefix score against the full cache's and the
means by task and needle half. Reads the recordings the run left in ``RUN/replay/``; records any that is missing.

    python benchmarks/recency_prior.py runs/smollm2-replay --weights 0 1 2 4 8 16
"""

from __future__ import annotations

import argparse

import torch
from _replay_scoring import print_means, score_recordings

from namm.evolution.lm import margin_score
from namm.evolution.recipe import load_recipe
from namm.evolution.replay import ReplayEvaluator, replay
from namm.memory.bam import flatten, unflatten

SLOWEST_SINE = 3  # head_weight index of sin(age * max_freq ** -3/4) in the default 8-dim age code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a replay run directory (its recipe.yaml and replay/ recordings)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0, 16.0])
    ap.add_argument("--samples", type=int, default=12, help="training samples per task (t0 ..)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(f"{args.run}/recipe.yaml")
    ev = ReplayEvaluator(recipe, args.run)
    policy = ev.policy
    named = unflatten(torch.as_tensor(ev.full_params(ev.initial_params())), policy.config)
    rows = []
    for c in args.weights:
        member = {k: v.clone() for k, v in named.items()}
        member["head_weight"][SLOWEST_SINE] = -c
        if "depth_logits" in member:
            member["depth_logits"].zero_()
        rows.append(flatten(member, policy.config))
    policy.set_population(torch.stack(rows).float())

    def score(rec):
        margins, _ = replay(ev.model, policy, rec, recipe.delay, recipe.chunk_size, recipe.replay_recompute)
        return margin_score(margins, rec.full_margins)

    scores = score_recordings(ev, args.samples, score, digits=2)
    print("\nweight c: " + " ".join(f"{c:g}" for c in args.weights))
    print_means(scores)


if __name__ == "__main__":
    main()
