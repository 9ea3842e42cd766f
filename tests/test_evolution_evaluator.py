"""Fitness, sample selection, the full-score cache, the toy evaluator and the local backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from namm.errors import NammError
from namm.evolution import (
    EvalResult,
    Evaluator,
    FullScoreCache,
    LocalBackend,
    fitness,
    select_samples,
    validation_samples,
)
from toy_evolution import QuadraticEvaluator


def test_fitness_is_mean_over_tasks_of_ratio_of_means():
    scores = {"a": np.array([[1.0, 0.0], [0.5, 0.5]]), "b": np.array([[0.2, 0.4, 0.6], [0.0, 0.0, 0.3]])}
    full = {"a": np.array([1.0, 0.5]), "b": np.array([0.6, 0.6, 0.6])}
    frac = {"a": np.array([[0.5, 0.5], [1.0, 1.0]]), "b": np.array([[0.2, 0.2, 0.2], [0.4, 0.4, 0.4]])}
    expected = np.array(
        [
            (0.5 / (0.75 + 1e-7) + 0.4 / (0.6 + 1e-7)) / 2,
            (0.5 / (0.75 + 1e-7) + 0.1 / (0.6 + 1e-7)) / 2,
        ]
    )
    np.testing.assert_allclose(fitness(scores, full), expected, rtol=1e-12)
    np.testing.assert_allclose(fitness(scores, full, frac, 0.0), expected, rtol=1e-12)
    mean_frac = np.array([(0.5 + 0.2) / 2, (1.0 + 0.4) / 2])
    np.testing.assert_allclose(fitness(scores, full, frac, 0.3), expected - 0.3 * mean_frac, rtol=1e-12)
    with pytest.raises(NammError, match="cache fractions"):
        fitness(scores, full, None, 0.3)
    with pytest.raises(NammError, match="full scores"):
        fitness(scores, {"a": np.ones(3), "b": np.ones(3)})


def test_sample_selection_is_seeded_and_shared():
    pool = [f"s{i}" for i in range(50)]
    a = select_samples(pool, 8, seed=1, generation=3, task="x")
    assert a == select_samples(pool, 8, seed=1, generation=3, task="x")
    assert len(set(a)) == 8 and set(a) <= set(pool)
    assert a == sorted(a, key=pool.index)
    assert a != select_samples(pool, 8, seed=1, generation=4, task="x")
    assert a != select_samples(pool, 8, seed=2, generation=3, task="x")
    assert a != select_samples(pool, 8, seed=1, generation=3, task="y")
    with pytest.raises(NammError, match="cannot draw 51"):
        select_samples(pool, 51, 0, 0, "x")
    v = validation_samples(pool, 5, seed=7, task="x")
    assert v == validation_samples(pool, 5, seed=7, task="x") and len(v) == 5
    assert validation_samples(pool, None, 7, "x") == pool


def test_full_score_cache_computes_once(tmp_path):
    calls = []

    def compute(task, ids):
        calls.append((task, list(ids)))
        return np.array([0.1 * int(i[1:]) for i in ids])

    cache = FullScoreCache(tmp_path / "full_scores.json")
    np.testing.assert_allclose(cache.get("t", ["s1", "s2"], compute), [0.1, 0.2])
    np.testing.assert_allclose(cache.get("t", ["s2", "s3", "s1"], compute), [0.2, 0.3, 0.1])
    assert calls == [("t", ["s1", "s2"]), ("t", ["s3"])]
    reopened = FullScoreCache(tmp_path / "full_scores.json")
    np.testing.assert_allclose(reopened.get("t", ["s3"], compute), [0.3])
    assert len(calls) == 2
    assert json.loads((tmp_path / "full_scores.json").read_text()) == {
        "t": {"s1": 0.1, "s2": 0.2, "s3": 0.30000000000000004}
    }
    with pytest.raises(NammError, match=r"in \[0, 1\]"):
        cache.get("t", ["s9"], lambda task, ids: np.array([1.5]))


def test_quadratic_evaluator_has_known_optimum():
    ev = QuadraticEvaluator(n_params=6, seed=1)
    assert isinstance(ev, Evaluator)
    ids = ev.sample_pool("a", "train")[:4]
    assert not set(ev.sample_pool("a", "train")) & set(ev.sample_pool("a", "validation"))
    params = np.stack([ev.target, np.zeros(6), ev.target + 0.5])
    res = ev.evaluate(params, "a", ids)
    assert res.scores.shape == (3, 4) and res.cache_fraction.shape == (3, 4)
    fit = fitness({"a": res.scores}, {"a": ev.full_scores("a", ids)})
    np.testing.assert_allclose(fit, ev.quality(params), rtol=1e-6)
    assert fit[0] == pytest.approx(1.0, abs=1e-6) and fit[0] > fit[1] > fit[2]


class _Recorder(QuadraticEvaluator):
    def __init__(self):
        super().__init__(n_params=5, seed=2)
        self.batches = []

    def evaluate(self, params, task, sample_ids):
        self.batches.append(len(params))
        return super().evaluate(params, task, sample_ids)


def test_local_backend_batches_members_without_changing_results():
    params = np.random.default_rng(0).normal(0, 0.1, (7, 5))
    ids = ["t1", "t5", "t9"]
    one = _Recorder()
    whole = LocalBackend(one, members_per_batch=7).evaluate(params, "a", ids)
    rec = _Recorder()
    split = LocalBackend(rec, members_per_batch=3).evaluate(params, "a", ids)
    assert rec.batches == [3, 3, 1] and one.batches == [7]
    assert np.array_equal(whole.scores, split.scores) and np.array_equal(whole.cache_fraction, split.cache_fraction)


class _Broken(QuadraticEvaluator):
    def evaluate(self, params, task, sample_ids):
        return EvalResult(np.full((len(params), len(sample_ids)), 2.0), np.zeros((len(params), len(sample_ids))))


def test_backend_rejects_bad_results():
    with pytest.raises(NammError, match=r"scores must lie in \[0, 1\]"):
        LocalBackend(_Broken(n_params=3)).evaluate(np.zeros((2, 3)), "a", ["t0"])
