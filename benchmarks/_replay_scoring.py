"""Shared by the replay benchmarks: score members on a replay run's first-stage recordings and summarise.

A *member* here is anything that turns one recording into a vector of soft-greedy-prefix scores against the full
cache's (one entry per policy or population row); :func:`score_recordings` runs it on every recording, printing a
line per sample, and :func:`print_means` prints the means by task and needle half and over all samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from namm.evolution.replay import ReplayEvaluator
from namm.tasks.synthetic import default_depth

#: ``scores[(task, index)] = (needle depth, scores)`` with one score per member.
Scores = dict[tuple[str, int], tuple[float, np.ndarray]]


def score_recordings(ev: ReplayEvaluator, samples: int, score: Callable[[object], ArrayLike],
                     digits: int = 3) -> Scores:
    """``score(recording)`` for the first ``samples`` training recordings of every task of the run's first stage
    (recorded when missing), one printed line per sample."""
    recipe = ev.recipe
    scores: Scores = {}
    for spec in recipe.stages[0].tasks:
        for i in range(samples):
            rec = ev.recording(spec.key, f"t{i}")
            t0 = time.perf_counter()
            s = np.asarray(score(rec), dtype=float)
            depth = default_depth(spec.name, recipe.seed, i)
            scores[(spec.name, i)] = (depth, s)
            print(f"{spec.name} t{i} depth {depth:.2f}: " + " ".join(f"{x:.{digits}f}" for x in s)
                  + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    return scores


def print_means(scores: Scores) -> None:
    """Means by task and needle half (first half: depth < 0.5), then over every sample."""
    for task in sorted({t for t, _ in scores}):
        for half, name in ((False, "first half"), (True, "second half")):
            v = [s for (t, _), (d, s) in scores.items() if t == task and (d >= 0.5) == half]
            if v:
                print(f"{task} {name} (n={len(v)}): " + " ".join(f"{x:.3f}" for x in np.mean(v, axis=0)))
    print(f"all (n={len(scores)}): " + " ".join(f"{x:.3f}" for x in np.mean([s for _, s in scores.values()], 0)))
