"""CMA-ES wrapper: reference settings, maximisation, and exact save/restore by replay (no pickle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from namm.errors import NammError
from namm.evolution import CMAES
from namm.evolution.optimizer import ReplayDrift

TARGET = np.linspace(-0.2, 0.3, 12)


def _fit(x: np.ndarray) -> np.ndarray:
    return -np.sum((x - TARGET[: x.shape[1]]) ** 2, axis=1)


def _step(opt: CMAES) -> np.ndarray:
    x = opt.ask()
    opt.tell(x, _fit(x))
    return x


def _same_state(a: CMAES, b: CMAES) -> None:
    assert a.state_dict() == b.state_dict()
    assert a.digest() == b.digest()
    assert np.array_equal(a._es.pc, b._es.pc) and np.array_equal(a._es.adapt_sigma.ps, b._es.adapt_sigma.ps)
    assert np.array_equal(a._rng_state[1], b._rng_state[1]) and a._rng_state[2:] == b._rng_state[2:]


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


def test_state_is_one_plain_json_file(tmp_path):
    opt = CMAES(6, 4, seed=1)
    x = _step(opt)
    opt.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json"]  # no pickle, no temporary left
    state = json.loads((tmp_path / "optimizer.json").read_text())
    assert state["format"] == "namm-cmaes-v2" and state["config"]["popsize"] == 4
    assert state["generations"] == [{"asks": 1, "fitness": _fit(x).tolist()}] and state["mean0"] == [0.0] * 6
    assert state["digest"] == opt.digest()


def test_refuses_files_it_did_not_write(tmp_path):
    opt = CMAES(6, 4, seed=1)
    for _ in range(3):
        _step(opt)
    opt.save(tmp_path)
    path = tmp_path / "optimizer.json"
    state = json.loads(path.read_text())
    tampered = json.loads(path.read_text())
    tampered["generations"][1]["fitness"].reverse()  # CMA-ES is rank-based: another order is another state
    path.write_text(json.dumps(tampered))
    with pytest.raises(NammError, match="does not reproduce its digest"):
        CMAES.load(tmp_path)
    for broken, match in [({**state, "format": "something"}, "not written by namm"),
                          ({**state, "generations": [{"asks": 1, "fitness": [1.0]}]}, "malformed"),
                          ({**state, "mean0": [1.0] * 6}, "digest"),
                          ({**state, "config": {"n_params": 6, "popsize": 4, "evil": 1}}, "invalid config")]:
        path.write_text(json.dumps(broken))
        with pytest.raises(NammError, match=match):
            CMAES.load(tmp_path)
    path.write_text("not json")
    with pytest.raises(NammError, match="not readable JSON"):
        CMAES.load(tmp_path)


def test_a_replay_on_other_numerics_resumes_with_a_warning_not_a_lost_run(tmp_path):
    opt = CMAES(6, 4, seed=1)
    for _ in range(3):
        _step(opt)
    opt.save(tmp_path)
    path = tmp_path / "optimizer.json"
    state = json.loads(path.read_text())
    # Another machine's replay: the digest differs, the mean and step size agree to the last bits.
    path.write_text(json.dumps({**state, "digest": "0" * 64, "mean": [v * (1 + 1e-9) for v in state["mean"]]}))
    with pytest.warns(ReplayDrift, match="not bit for bit"):
        restored, _ = CMAES.load(tmp_path)
    np.testing.assert_array_equal(restored.mean, opt.mean)
    assert restored.generation == 3 and restored.sigma == opt.sigma
    # A mean that is off by more than rounding is refused, digest or not.
    path.write_text(json.dumps({**state, "digest": "0" * 64, "mean": [v + 1e-3 for v in state["mean"]]}))
    with pytest.raises(NammError, match="nor its mean and step size"):
        CMAES.load(tmp_path)


def test_legacy_state_is_refused_with_the_commit_to_resume_with(tmp_path):
    (tmp_path / "optimizer.json").write_text(json.dumps({"format": "namm-cmaes-v1", "config": {}}))
    (tmp_path / "optimizer.safetensors").write_bytes(b"old")
    assert CMAES.saved_in(tmp_path)
    with pytest.raises(NammError, match=r"namm-cmaes-v1 .* at commit b1019d4 \(git checkout b1019d4\)") as err:
        CMAES.load(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "optimizer.json").unlink()  # the safetensors file alone is refused the same way
    with pytest.raises(NammError, match="b1019d4"):
        CMAES.load(tmp_path)


def test_pending_asks_and_repeated_asks_are_replayed(tmp_path):
    straight = CMAES(5, 4, seed=7)
    straight.ask()  # a discarded population
    _step(straight)
    pending = straight.ask()
    straight.save(tmp_path)
    resumed, _ = CMAES.load(tmp_path)
    _same_state(resumed, straight)
    resumed.tell(pending, _fit(pending))  # the pending population can still be told
    straight.tell(pending, _fit(pending))
    _same_state(resumed, straight)
    with pytest.raises(NammError, match="last ask"):
        resumed.tell(pending, _fit(pending))


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
    opt.tell(x, np.arange(4.0))
    state = opt.state_dict()
    with pytest.raises(NammError, match="config"):
        CMAES(5, 6).load_state_dict(state)
    with pytest.raises(NammError, match="fresh optimizer"):
        opt.load_state_dict(state)
    with pytest.raises(NammError, match="initial mean"):
        CMAES(5, 4, mean0=np.ones(5)).load_state_dict(state)
    with pytest.warns(ReplayDrift, match="pycma 0.1"):  # same mean and sigma, other digest: resumes, says why
        CMAES(5, 4).load_state_dict({**state, "pycma_version": "0.1", "digest": "0" * 64})
    with pytest.raises(NammError, match="pycma 0.1"):
        CMAES(5, 4).load_state_dict({**state, "pycma_version": "0.1", "digest": "0" * 64, "sigma": 2 * opt.sigma})
    with pytest.raises(NammError, match="No optimizer state"):
        CMAES.load(tmp_path)
