"""The Ray backend gives the same results as the local backend (on a small local Ray instance)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import ray

import toy_evolution
from namm.evolution import LocalBackend, RayBackend, Recipe, evolve, fitness, read_log
from toy_evolution import QuadraticEvaluator, save_params

N = 10
FACTORY = functools.partial(QuadraticEvaluator, n_params=N, seed=3)


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(toy_evolution)  # the workers cannot import the tests' helpers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_backend_matches_local(local_ray):
    params = np.random.default_rng(0).normal(0, 0.2, (7, N))
    ids = {"a": ["t3", "t8", "t21"], 'b:{"depth":1}': ["t0", "t9"]}
    local = LocalBackend(FACTORY(), members_per_batch=3)
    remote = RayBackend(FACTORY, num_workers=2, members_per_batch=3)
    try:
        assert np.array_equal(remote.initial_params(), local.initial_params())
        assert remote.sample_pool("a", "validation") == local.sample_pool("a", "validation")
        results = {}
        for backend in (local, remote):
            scores, full, frac = {}, {}, {}
            for task, sample_ids in ids.items():
                res = backend.evaluate(params, task, sample_ids)
                scores[task], frac[task], full[task] = (
                    res.scores,
                    res.cache_fraction,
                    backend.full_scores(task, sample_ids),
                )
            results[backend] = (scores, frac, full, fitness(scores, full, frac, 0.1))
        for part_local, part_remote in zip(results[local][:3], results[remote][:3], strict=True):
            for task in ids:
                assert np.array_equal(part_local[task], part_remote[task])
        assert np.array_equal(results[local][3], results[remote][3])
    finally:
        remote.close()
    assert ray.is_initialized()  # the backend did not start Ray, so it leaves it running


def test_evolve_on_ray_matches_local(local_ray, tmp_path):
    spec = {
        "model": "toy",
        "population": 6,
        "samples_per_task": 2,
        "members_per_batch": 2,
        "stages": [{"name": "s", "generations": 2, "tasks": ["a"]}],
        "validation": {"every": 2, "samples": 2, "tasks": ["a"]},
    }
    evolve(Recipe.from_dict(spec), tmp_path / "local", False, FACTORY, progress=False, plot=False,
           save_checkpoint=save_params)
    ray_recipe = Recipe.from_dict({**spec, "backend": "ray", "ray": {"num_workers": 2}})
    evolve(ray_recipe, tmp_path / "ray", False, FACTORY, progress=False, plot=False, save_checkpoint=save_params)
    strip = ("seconds", "eval_seconds")
    logs = [[{k: v for k, v in r.items() if k not in strip} for r in read_log(tmp_path / d)] for d in ("local", "ray")]
    assert logs[0] == logs[1] and len(logs[0]) == 2
    assert (tmp_path / "local/optimizer.json").read_text() == (tmp_path / "ray/optimizer.json").read_text()
