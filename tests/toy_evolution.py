"""Test helpers for the evolution loop: a deterministic toy evaluator with a known optimum and a checkpoint writer.

Not collected as tests (no ``test_`` prefix); test modules import it like ``conftest``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from namm.errors import NammError
from namm.evolution.evaluator import SPLITS, EvalResult


def save_params(params: np.ndarray, path: Path) -> None:
    """A checkpoint writer for :func:`namm.evolution.evolve`: ``path/params.safetensors`` with the flat float64
    parameter vector."""
    save_file({"params": np.ascontiguousarray(params, dtype=np.float64)}, str(Path(path) / "params.safetensors"))


class QuadraticEvaluator:
    """Deterministic toy evaluator with a known optimum, for tests.

    Sample ``s`` of task ``t`` has a difficulty ``u in [0.5, 1]`` (a hash of ``t`` and ``s``). The full cache
    scores ``u``; parameters ``x`` score ``u * exp(-|x - target|^2 / width)``. The fitness is therefore
    ``exp(-|x - target|^2 / width)`` on any samples: 1 at ``x = target``. The kept-cache fraction is
    ``sigmoid(mean(x))``. ``target`` is drawn from ``N(0, target_scale^2)`` with ``seed``.
    """

    def __init__(
        self,
        n_params: int = 20,
        seed: int = 0,
        width: float = 1.0,
        target_scale: float = 0.1,
        train_size: int = 100,
        validation_size: int = 20,
    ) -> None:
        self.n_params, self.width = n_params, width
        self.target = np.random.default_rng(seed).normal(0.0, target_scale, n_params)
        self.sizes = {"train": train_size, "validation": validation_size}

    def initial_params(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def sample_pool(self, task: str, split: str) -> list[str]:
        if split not in SPLITS:
            raise NammError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        prefix = "t" if split == "train" else "v"
        return [f"{prefix}{i}" for i in range(self.sizes[split])]

    def _difficulty(self, task: str, sample_id: str) -> float:
        return 0.5 + 0.5 * (zlib.crc32(f"{task}/{sample_id}".encode()) % 10_000) / 9_999

    def full_scores(self, task: str, sample_ids: list[str]) -> np.ndarray:
        return np.array([self._difficulty(task, s) for s in sample_ids])

    def quality(self, params: np.ndarray) -> np.ndarray:
        """``(P,)`` ``exp(-|x - target|^2 / width)``, row by row (independent of the batch)."""
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        return np.array([np.exp(-float(np.sum((row - self.target) ** 2)) / self.width) for row in params])

    def evaluate(self, params: np.ndarray, task: str, sample_ids: list[str]) -> EvalResult:
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        if params.shape[1] != self.n_params:
            raise NammError(f"QuadraticEvaluator has {self.n_params} parameters, got rows of {params.shape[1]}.")
        u = self.full_scores(task, sample_ids)
        scores = self.quality(params)[:, None] * u[None, :]
        frac = np.array([1.0 / (1.0 + np.exp(-float(np.mean(row)))) for row in params])
        return EvalResult(scores, np.repeat(frac[:, None], len(sample_ids), axis=1), 0.0)
