"""Where evaluations run: in this process (:class:`LocalBackend`) or on Ray actors (:class:`RayBackend`).

A backend exposes the :class:`~namm.evolution.evaluator.Evaluator` methods plus :meth:`close`, splits a
population into batches of ``members_per_batch`` rows (one forward pass evaluates one batch) and returns
results in population/sample order. Because an evaluator's scores depend only on ``(row, task, sample)``,
both backends give identical fitness for the same members and samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from namm.errors import NammError
from namm.evolution.evaluator import EvalResult, Evaluator, check_result


def _batches(n_rows: int, size: int) -> list[tuple[int, int]]:
    return [(b, min(b + size, n_rows)) for b in range(0, n_rows, size)]


class LocalBackend:
    """Runs one evaluator in this process, ``members_per_batch`` population rows per call."""

    def __init__(self, evaluator: Evaluator, members_per_batch: int = 1) -> None:
        if members_per_batch < 1:
            raise NammError(f"members_per_batch must be >= 1, got {members_per_batch}.")
        self.evaluator, self.members_per_batch = evaluator, members_per_batch

    def initial_params(self) -> np.ndarray:
        return np.asarray(self.evaluator.initial_params(), dtype=np.float64).reshape(-1)

    def sample_pool(self, task: str, split: str) -> list[str]:
        return [str(s) for s in self.evaluator.sample_pool(task, split)]

    def full_scores(self, task: str, sample_ids: list[str]) -> np.ndarray:
        return np.asarray(self.evaluator.full_scores(task, list(sample_ids)), dtype=np.float64).reshape(-1)

    def evaluate(self, params: np.ndarray, task: str, sample_ids: list[str]) -> EvalResult:
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        parts = []
        for b0, b1 in _batches(len(params), self.members_per_batch):
            res = self.evaluator.evaluate(params[b0:b1], task, list(sample_ids))
            parts.append(check_result(res, b1 - b0, len(sample_ids), f"evaluate({task!r}) rows {b0}:{b1}"))
        return EvalResult(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.cache_fraction for p in parts]),
            sum(p.seconds for p in parts),
        )

    def close(self) -> None:
        """Nothing to release."""


class _EvaluatorWorker:
    """Body of a Ray actor: one evaluator (model replica) built from a picklable factory."""

    def __init__(self, factory: Callable[[], Evaluator]) -> None:
        self.evaluator = factory()

    def initial_params(self) -> np.ndarray:
        return np.asarray(self.evaluator.initial_params(), dtype=np.float64).reshape(-1)

    def sample_pool(self, task: str, split: str) -> list[str]:
        return [str(s) for s in self.evaluator.sample_pool(task, split)]

    def full_scores(self, task: str, sample_ids: list[str]) -> np.ndarray:
        return np.asarray(self.evaluator.full_scores(task, sample_ids), dtype=np.float64).reshape(-1)

    def evaluate(self, params: np.ndarray, b0: int, b1: int, task: str, sample_ids: list[str]) -> EvalResult:
        res = self.evaluator.evaluate(np.array(params[b0:b1]), task, sample_ids)
        return check_result(res, b1 - b0, len(sample_ids), f"evaluate({task!r}) rows {b0}:{b1}")


class RayBackend:
    """Evaluations on ``num_workers`` Ray actors, each holding its own evaluator built by ``evaluator_factory``.

    Work is split into ``(member batch, sample)`` jobs, spread over the actors and gathered in job order.

    Args:
        evaluator_factory: picklable zero-argument callable building an evaluator (a model replica).
        num_workers: number of actors.
        address: Ray cluster address; ``None`` joins the running local instance or starts one.
        members_per_batch: population rows per evaluator call.
        num_cpus_per_worker / num_gpus_per_worker: Ray resources reserved per actor.
        init_kwargs: extra ``ray.init`` arguments when this backend starts Ray.
    """

    def __init__(
        self,
        evaluator_factory: Callable[[], Evaluator],
        num_workers: int,
        address: str | None = None,
        members_per_batch: int = 1,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as e:
            raise NammError("The Ray backend needs Ray: pip install 'namm[ray]'.") from e
        if num_workers < 1 or members_per_batch < 1:
            raise NammError(f"num_workers and members_per_batch must be >= 1, got {num_workers}, {members_per_batch}.")
        self._ray, self._pool_cls = ray, ActorPool
        self.members_per_batch = members_per_batch
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=address, include_dashboard=False, **(init_kwargs or {}))
        actor_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(_EvaluatorWorker)
        self.actors = [actor_cls.remote(evaluator_factory) for _ in range(num_workers)]
        self._cache: dict[tuple, Any] = {}

    def _first(self, method: str, *args: Any) -> Any:
        key = (method, *args)
        if key not in self._cache:
            self._cache[key] = self._ray.get(getattr(self.actors[0], method).remote(*args))
        return self._cache[key]

    def initial_params(self) -> np.ndarray:
        return np.array(self._first("initial_params"))

    def sample_pool(self, task: str, split: str) -> list[str]:
        return list(self._first("sample_pool", task, split))

    def _map(self, fn: Callable, jobs: list) -> list:
        return list(self._pool_cls(self.actors).map(fn, jobs))

    def full_scores(self, task: str, sample_ids: list[str]) -> np.ndarray:
        parts = self._map(lambda a, sid: a.full_scores.remote(task, [sid]), list(sample_ids))
        return np.concatenate(parts) if parts else np.zeros(0)

    def evaluate(self, params: np.ndarray, task: str, sample_ids: list[str]) -> EvalResult:
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        ref = self._ray.put(params)
        batches = _batches(len(params), self.members_per_batch)
        jobs = [(b0, b1, j) for b0, b1 in batches for j in range(len(sample_ids))]
        results = self._map(lambda a, job: a.evaluate.remote(ref, job[0], job[1], task, [sample_ids[job[2]]]), jobs)
        scores = np.zeros((len(params), len(sample_ids)))
        frac = np.zeros_like(scores)
        for (b0, b1, j), res in zip(jobs, results, strict=True):
            scores[b0:b1, j] = res.scores[:, 0]
            frac[b0:b1, j] = res.cache_fraction[:, 0]
        return EvalResult(scores, frac, float(sum(r.seconds for r in results)))

    def close(self) -> None:
        """Stop the actors (and Ray, if this backend started it)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._started_ray:
            self._ray.shutdown()
