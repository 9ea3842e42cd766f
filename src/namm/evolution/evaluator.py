"""What the evolution loop needs from a model: the :class:`Evaluator` protocol, the fitness, sample selection.

An evaluator runs the LM on task samples, either with the full KV cache or with the NAMM given by each row
of a parameter matrix. Tasks are identified by their :attr:`~namm.evolution.recipe.TaskSpec.key` string
(``TaskSpec.from_key`` recovers name and options). Scores must depend only on ``(params row, task,
sample id)``, not on which other rows or samples share the call: backends split and regroup the work.

This module also holds the fitness (ratio of means, as in the reference), the per-generation sample draw,
and the on-disk cache of full-cache scores.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from namm.atomic import atomic_write_json
from namm.errors import NammError

EPS = 1e-7
SPLITS = ("train", "validation")


@dataclass
class EvalResult:
    """Scores of ``P`` parameter rows on ``S`` samples.

    Attributes:
        scores: ``(P, S)`` task metric in ``[0, 1]``.
        cache_fraction: ``(P, S)`` mean kept KV cache / full KV cache over the sample's run.
        seconds: wall-clock seconds spent.
    """

    scores: np.ndarray
    cache_fraction: np.ndarray
    seconds: float = 0.0


@runtime_checkable
class Evaluator(Protocol):
    """A model replica that scores NAMM parameters on task samples."""

    def initial_params(self) -> np.ndarray:
        """The NAMM's initial flat parameter vector ``(n,)`` (the CMA-ES starting mean)."""
        ...

    def sample_pool(self, task: str, split: str) -> list[str]:
        """All sample ids of ``task`` in ``split`` (``"train"`` or ``"validation"``); the two are disjoint."""
        ...

    def full_scores(self, task: str, sample_ids: list[str]) -> np.ndarray:
        """``(S,)`` full-cache scores in ``[0, 1]``."""
        ...

    def evaluate(self, params: np.ndarray, task: str, sample_ids: list[str]) -> EvalResult:
        """Score every row of ``params`` ``(P, n)`` on every sample."""
        ...


def check_result(result: EvalResult, n_rows: int, n_samples: int, what: str) -> EvalResult:
    """Validate an evaluator's answer (shapes, ranges); returns it with float64 arrays."""
    scores = np.asarray(result.scores, dtype=np.float64)
    frac = np.asarray(result.cache_fraction, dtype=np.float64)
    for name, arr in (("scores", scores), ("cache_fraction", frac)):
        if arr.shape != (n_rows, n_samples):
            raise NammError(f"{what}: {name} has shape {arr.shape}, expected ({n_rows}, {n_samples}).")
        if not np.all(np.isfinite(arr)) or arr.min(initial=0.0) < 0.0:
            raise NammError(f"{what}: {name} must be finite and >= 0, got {arr.tolist()}.")
    if scores.max(initial=0.0) > 1.0:
        raise NammError(f"{what}: scores must lie in [0, 1], got max {scores.max()}.")
    return EvalResult(scores, frac, float(result.seconds))


def fitness(
    member_scores_by_task: dict[str, np.ndarray],
    full_scores_by_task: dict[str, np.ndarray],
    cache_fraction_by_task: dict[str, np.ndarray] | None = None,
    cache_weight: float = 0.0,
) -> np.ndarray:
    """Fitness of ``P`` members: mean over tasks of ``mean(member scores) / (mean(full scores) + 1e-7)``.

    Args:
        member_scores_by_task: task -> ``(P, S_task)`` scores.
        full_scores_by_task: task -> ``(S_task,)`` full-cache scores on the same samples.
        cache_fraction_by_task: task -> ``(P, S_task)`` kept-cache fractions (needed if ``cache_weight > 0``).
        cache_weight: when > 0, ``cache_weight * mean kept-cache fraction`` (over tasks and samples) is subtracted.

    Returns:
        ``(P,)`` fitness, higher is better.
    """
    if not member_scores_by_task:
        raise NammError("fitness() needs at least one task.")
    ratios = []
    for task, scores in member_scores_by_task.items():
        scores = np.asarray(scores, dtype=np.float64)
        full = np.asarray(full_scores_by_task[task], dtype=np.float64)
        if scores.ndim != 2 or full.shape != (scores.shape[1],):
            raise NammError(f"fitness(): task {task!r} has scores {scores.shape} but full scores {full.shape}.")
        ratios.append(scores.mean(axis=1) / (full.mean() + EPS))
    fit = np.mean(ratios, axis=0)
    if cache_weight > 0:
        if cache_fraction_by_task is None:
            raise NammError("fitness(): cache_weight > 0 needs cache fractions.")
        fit = fit - cache_weight * mean_cache_fraction(cache_fraction_by_task)
    return fit


def mean_cache_fraction(cache_fraction_by_task: dict[str, np.ndarray]) -> np.ndarray:
    """``(P,)`` mean over tasks of each member's mean kept-cache fraction."""
    return np.mean([np.asarray(f, dtype=np.float64).mean(axis=1) for f in cache_fraction_by_task.values()], axis=0)


def _task_salt(task: str) -> int:
    return zlib.crc32(task.encode("utf-8"))


def select_samples(pool: Sequence[str], k: int, seed: int, generation: int, task: str) -> list[str]:
    """The ``k`` sample ids (without replacement) that ``task`` uses in ``generation``.

    The draw depends only on ``(seed, generation, task, pool)``, so a resumed run draws the same ids and adding
    a task in a later stage does not change the other tasks' draws. Ids keep the pool's order.
    """
    if k > len(pool):
        raise NammError(f"Task {task!r} has {len(pool)} training samples; cannot draw {k} per generation.")
    rng = np.random.default_rng([int(seed), int(generation), _task_salt(task)])
    idx = np.sort(rng.choice(len(pool), size=k, replace=False))
    return [pool[i] for i in idx]


def validation_samples(pool: Sequence[str], k: int | None, seed: int, task: str) -> list[str]:
    """The fixed validation subset of ``task`` (all of the pool if ``k`` is None or exceeds it)."""
    if k is None or k >= len(pool):
        return list(pool)
    rng = np.random.default_rng([int(seed), _task_salt(task), 0x5A11])
    idx = np.sort(rng.choice(len(pool), size=k, replace=False))
    return [pool[i] for i in idx]


class FullScoreCache:
    """Full-cache per-sample scores on disk (``full_scores.json``: task -> sample id -> score).

    Each score is computed once (the first time a sample is drawn) and reused, also across resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, dict[str, float]] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError as e:
                raise NammError(f"{self.path} is not valid JSON ({e}); delete it to recompute.") from e

    def get(self, task: str, sample_ids: list[str], compute: Callable[[str, list[str]], np.ndarray]) -> np.ndarray:
        """``(S,)`` scores of ``sample_ids``; missing ones come from ``compute(task, missing_ids)`` and are saved."""
        known = self.data.setdefault(task, {})
        missing = list(dict.fromkeys(s for s in sample_ids if s not in known))
        if missing:
            new = np.asarray(compute(task, missing), dtype=np.float64).reshape(-1)
            if new.shape != (len(missing),) or not np.all(np.isfinite(new)) or new.min() < 0 or new.max() > 1:
                raise NammError(f"full_scores({task!r}) must return {len(missing)} scores in [0, 1], got {new}.")
            known.update({s: float(v) for s, v in zip(missing, new, strict=True)})
            atomic_write_json(self.path, self.data)
        return np.array([known[s] for s in sample_ids], dtype=np.float64)
