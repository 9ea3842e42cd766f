"""CMA-ES wrapper: reference settings, maximisation, and exact pickle-free save/restore."""

from __future__ import annotations

import json

import numpy as np
import pytest

from namm.errors import NammError
from namm.evolution import CMAES

TARGET = np.linspace(-0.2, 0.3, 12)


def _fit(x: np.ndarray) -> np.ndarray:
    return -np.sum((x - TARGET[: x.shape[1]]) ** 2, axis=1)


def _step(opt: CMAES) -> np.ndarray:
    x = opt.ask()
    opt.tell(x, _fit(x))
    return x


def _same_state(a: CMAES, b: CMAES) -> None:
    ta, ma = a.state_dict()
    tb, mb = b.state_dict()
    assert ma == mb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), k


@pytest.mark.parametrize("diagonal", [False, True])
def test_resume_from_disk_is_exact(tmp_path, diagonal):
    straight = CMAES(12, 8, seed=5, diagonal=diagonal)
    for _ in range(3):
        _step(straight)
    mean, sigma, cov = straight.mean, straight.sigma, straight.C
    next_straight = straight.ask()

    first = CMAES(12, 8, seed=5, diagonal=diagonal)
    for _ in range(2):
        _step(first)
    first.save(tmp_path, extra={"note": "two generations"})
    del first
    resumed, extra = CMAES.load(tmp_path)
    assert extra == {"note": "two generations"}
    assert resumed.generation == 2
    last = _step(resumed)
    assert resumed.generation == 3

    assert np.array_equal(resumed.mean, mean)
    assert resumed.sigma == sigma
    assert np.array_equal(resumed.C, cov)
    assert cov.shape == ((12,) if diagonal else (12, 12))
    assert np.array_equal(resumed.best_ever[0], straight.best_ever[0])
    next_resumed = resumed.ask()
    assert np.array_equal(next_resumed, next_straight)
    _same_state(resumed, straight)
    assert last.shape == (8, 12)


def test_files_are_safe_formats(tmp_path):
    opt = CMAES(6, 4, seed=1)
    _step(opt)
    opt.save(tmp_path)
    meta = json.loads((tmp_path / "optimizer.json").read_text())
    assert meta["format"] == "namm-cmaes-v1" and meta["config"]["popsize"] == 4
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "optimizer.safetensors"))
    assert np.array_equal(tensors["cma/mean"], opt.mean)
    assert tensors["rng/mt19937_keys"].shape == (624,)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob(".*tmp"))


def test_stale_json_mirror_is_repaired(tmp_path):
    """A crash between the two writes leaves a new .safetensors and an old .json: the former wins."""
    opt = CMAES(6, 4, seed=2)
    _step(opt)
    opt.save(tmp_path)
    stale = (tmp_path / "optimizer.json").read_text()
    _step(opt)
    opt.save(tmp_path)
    (tmp_path / "optimizer.json").write_text(stale)
    loaded, _ = CMAES.load(tmp_path)
    assert loaded.generation == 2 and np.array_equal(loaded.mean, opt.mean)
    assert json.loads((tmp_path / "optimizer.json").read_text())["state"] == opt.state_dict()[1]["state"]


def test_global_rng_is_neither_used_nor_disturbing():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    a = CMAES(5, 6, seed=0)
    xa = a.ask()
    assert np.array_equal(np.random.rand(3), expected)
    np.random.seed(999)
    b = CMAES(5, 6, seed=0)
    assert np.array_equal(b.ask(), xa)
    assert not np.array_equal(CMAES(5, 6, seed=1).ask(), xa)


def test_reference_settings_and_maximisation():
    opt = CMAES(10, 8, sigma0=0.065, seed=0)
    es = opt._es
    assert es.sp.weights.mu == 4 and es.sp.cmean == 1.0 and es.sp.lam_mirr == 0
    assert np.array_equal(opt.mean, np.zeros(10)) and opt.sigma == 0.065
    x = opt.ask()
    assert x.shape == (8, 10)
    fit = x @ np.ones(10)  # maximise the sum: the mean must move towards +1
    opt.tell(x, fit)
    assert opt.mean.sum() > 0
    assert opt.best_ever[1] == pytest.approx(fit.max())
    assert np.array_equal(opt.best_ever[0], x[np.argmax(fit)])


def test_converges_on_quadratic():
    opt = CMAES(12, 10, seed=3)
    for _ in range(150):
        _step(opt)
    assert np.linalg.norm(opt.mean - TARGET) < 1e-2 * np.linalg.norm(TARGET)


def test_bad_arguments_and_mismatched_state(tmp_path):
    with pytest.raises(NammError, match="popsize"):
        CMAES(5, 1)
    with pytest.raises(NammError, match="mean0"):
        CMAES(5, 4, mean0=np.zeros(3))
    opt = CMAES(5, 4)
    with pytest.raises(NammError, match="solutions"):
        opt.tell(np.zeros((3, 5)), np.zeros(3))
    x = opt.ask()
    with pytest.raises(NammError, match="non-finite"):
        opt.tell(x, np.array([0.0, np.nan, 1.0, 2.0]))
    tensors, meta = opt.state_dict()
    with pytest.raises(NammError, match="config"):
        CMAES(5, 6).load_state_dict(tensors, meta)
    with pytest.raises(NammError, match="pycma 0.1"):
        CMAES(5, 4).load_state_dict(tensors, {**meta, "pycma_version": "0.1"})
    with pytest.raises(NammError, match="No optimizer state"):
        CMAES.load(tmp_path)
