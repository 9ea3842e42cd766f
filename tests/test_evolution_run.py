"""The evolution loop on the toy quadratic evaluator: convergence, files, stages, determinism and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import namm
from namm.errors import NammError
from namm.evolution import CMAES, Recipe, evolve, fitness, plot_run, read_log, select_samples
from toy_evolution import QuadraticEvaluator, save_params

N = 20
TIMINGS = ("seconds", "eval_seconds")
RECIPE = {
    "model": "toy",
    "population": 8,
    "samples_per_task": 3,
    "seed": 11,
    "cache_weight": 0.05,
    "members_per_batch": 3,
    "stages": [
        {"name": "first", "generations": 3, "tasks": ["a"]},
        {"name": "second", "generations": 3, "tasks": ["a", {"name": "b", "options": {"depth": 0.5}}]},
    ],
    "validation": {"every": 2, "samples": 4, "tasks": ["a"]},
}
B_KEY = 'b:{"depth":0.5}'


def toy() -> QuadraticEvaluator:
    return QuadraticEvaluator(n_params=N, seed=0)


def recipe(**overrides) -> Recipe:
    return Recipe.from_dict({**RECIPE, **overrides})


def snapshot(run_dir: Path) -> dict:
    """Everything a run leaves behind except wall-clock timings and the picture."""
    log = [{k: v for k, v in rec.items() if k not in TIMINGS} for rec in read_log(run_dir)]
    ckpts = {}
    for name in ("best", "latest"):
        d = run_dir / "checkpoints" / name
        ckpts[name] = (
            load_file(str(d / "params.safetensors"))["params"].tolist(),
            json.loads((d / "evolution.json").read_text()),
        )
    return {
        "log": log,
        "optimizer": json.loads((run_dir / "optimizer.json").read_text()),
        "mean": CMAES.load(run_dir)[0].mean.tolist(),
        "full": json.loads((run_dir / "full_scores.json").read_text()),
        "checkpoints": ckpts,
        "recipe": (run_dir / "recipe.yaml").read_text(),
    }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    result = evolve(recipe(), run_dir, False, toy, progress=False, save_checkpoint=save_params)
    assert result.generations == 6
    return run_dir, snapshot(run_dir)


def test_converges_on_toy_quadratic(tmp_path):
    r = Recipe.from_dict(
        {
            "model": "toy",
            "population": 12,
            "samples_per_task": 4,
            "stages": [{"name": "only", "generations": 60, "tasks": ["a"]}],
            "validation": {"every": 20, "samples": 5, "tasks": ["a"]},
        }
    )
    result = evolve(r, tmp_path / "run", False, toy, progress=False, plot=False, save_checkpoint=save_params)
    ev = toy()
    start, final = ev.quality(np.zeros(N))[0], ev.quality(result.mean)[0]
    assert start < 0.9 and final > 0.995
    log = read_log(tmp_path / "run")
    assert len(log) == 60 and log[-1]["best"] > 0.99 and log[-1]["mean"] > log[0]["mean"] + 0.1
    assert log[-1]["sigma"] < log[0]["sigma"] == 0.065
    assert result.best_generation == 60 and result.best_validation == pytest.approx(final, abs=1e-6)
    best = load_file(str(tmp_path / "run/checkpoints/best/params.safetensors"))["params"]
    assert np.array_equal(best, result.mean)


def test_run_dir_contents(baseline):
    run_dir, snap = baseline
    names = {p.name for p in run_dir.iterdir()}
    assert {"recipe.yaml", "optimizer.json", "log.jsonl", "full_scores.json"} <= names
    assert {"fitness.png", "checkpoints"} <= names
    assert (run_dir / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    log = read_log(run_dir)
    assert [r["generation"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in log] == ["first"] * 3 + ["second"] * 3
    assert [r["generation"] for r in log if "validation" in r] == [2, 3, 4, 6]  # every 2 and at stage ends
    assert set(log[0]["tasks"]) == {"a"} and set(log[-1]["tasks"]) == {"a", B_KEY}
    for rec in log:
        assert rec["best"] >= rec["median"] and 0 < rec["cache_fraction"] < 1 and rec["seconds"] >= 0
    assert set(snap["full"]) == {"a", B_KEY}
    best_gen = snap["optimizer"]["extra"]["best_generation"]
    assert snap["checkpoints"]["best"][1]["generation"] == best_gen
    assert snap["checkpoints"]["latest"][1]["generation"] == 6
    assert snap["optimizer"]["extra"]["best_validation"] == max(r["validation"] for r in log if "validation" in r)


def test_same_seed_same_run(baseline, tmp_path):
    evolve(recipe(), tmp_path / "again", False, toy, progress=True, plot=False,
           save_checkpoint=save_params)  # progress bars must not matter
    assert snapshot(tmp_path / "again") == baseline[1]
    evolve(recipe(seed=12), tmp_path / "other", False, toy, progress=False, plot=False, save_checkpoint=save_params)
    assert snapshot(tmp_path / "other")["log"] != baseline[1]["log"]


def test_stages_carry_the_optimizer_state(baseline):
    """Replaying the loop by hand with one optimizer across both stages reproduces the run exactly."""
    _, snap = baseline
    r, ev = recipe(), toy()
    opt = CMAES(N, r.population, r.sigma0, r.seed, r.diagonal)
    sigmas = []
    for g, stage in enumerate([r.stages[0]] * 3 + [r.stages[1]] * 3):
        sigmas.append(opt.sigma)
        x = opt.ask()
        scores, full, frac = {}, {}, {}
        for t in stage.tasks:
            ids = select_samples(ev.sample_pool(t.key, "train"), r.samples_per_task, r.seed, g, t.key)
            res = ev.evaluate(x, t.key, ids)
            scores[t.key], full[t.key], frac[t.key] = res.scores, ev.full_scores(t.key, ids), res.cache_fraction
        opt.tell(x, fitness(scores, full, frac, r.cache_weight))
    assert np.array_equal(np.array(snap["mean"]), opt.mean)
    assert [rec["sigma"] for rec in snap["log"]] == sigmas
    assert sigmas[3] != r.sigma0  # stage 2 starts from stage 1's state, not afresh


class _CrashOnSecondB(QuadraticEvaluator):
    """Fails in generation 5 (stage 2's second), after task a and one batch of task b were scored.

    Task b is evaluated in 3 member batches per generation (8 members, 3 per batch): calls 1-3 are generation 4.
    """

    def __init__(self, crash) -> None:
        super().__init__(n_params=N, seed=0)
        self.crash, self.b_calls = crash, 0

    def evaluate(self, params, task, sample_ids):
        if task.startswith("b"):
            self.b_calls += 1
            if self.b_calls == 5:
                self.crash()
        return super().evaluate(params, task, sample_ids)


def _raise() -> None:
    raise RuntimeError("simulated crash")


def test_resume_after_crash_mid_generation(baseline, tmp_path):
    run_dir = tmp_path / "run"
    prepared = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        evolve(recipe(), run_dir, False, lambda: _CrashOnSecondB(_raise), progress=False, prepare=prepared.append,
               save_checkpoint=save_params)
    assert prepared == [run_dir] and (run_dir / "prepared.done").exists()
    assert [r["generation"] for r in read_log(run_dir)] == [1, 2, 3, 4]
    assert CMAES.load(run_dir)[0].generation == 4
    # as if the process died after logging generation 5 but before saving its state
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps({"generation": 5, "stage": "second"}) + '\n{"generation": 6, "sta')
    with pytest.raises(NammError, match="already holds an evolution run"):
        evolve(recipe(), run_dir, False, toy, progress=False, save_checkpoint=save_params)
    result = evolve(recipe(), run_dir, True, toy, progress=False, prepare=prepared.append, save_checkpoint=save_params)
    assert prepared == [run_dir] and result.generations == 6
    assert snapshot(run_dir) == baseline[1]
    code = json.loads((run_dir / "code.json").read_text())["runs"]  # the start and the resume, same code
    assert len(code) == 2 and code[0]["namm"] == code[1]["namm"] and code[0]["commit"] == code[1]["commit"]
    assert {"commit", "dirty", "source", "at"} <= set(code[0])


def test_a_resume_with_other_code_warns(tmp_path, capsys):
    run_dir = tmp_path / "run"
    evolve(recipe(), run_dir, False, toy, progress=False, save_checkpoint=save_params)
    code = json.loads((run_dir / "code.json").read_text())
    code["runs"][0]["commit"] = "0" * 40
    (run_dir / "code.json").write_text(json.dumps(code))
    capsys.readouterr()
    evolve(recipe(), run_dir, True, toy, progress=False, save_checkpoint=save_params)
    assert f"started with namm {namm.__version__} at commit {'0' * 40}" in capsys.readouterr().err


def test_resume_after_kill_9(baseline, tmp_path):
    run_dir = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(recipe().to_yaml())
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_evolution_run import _CrashOnSecondB, save_params
        from namm.evolution import evolve
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
        evolve({str(recipe_path)!r}, {str(run_dir)!r}, False, lambda: _CrashOnSecondB(kill), progress=False,
               save_checkpoint=save_params)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(read_log(run_dir)) == 4
    evolve(recipe_path, run_dir, True, toy, progress=False, save_checkpoint=save_params)
    assert snapshot(run_dir) == baseline[1]


def test_run_dir_guards(baseline, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(baseline[0], run_dir)
    with pytest.raises(NammError, match="already holds an evolution run"):
        evolve(recipe(), run_dir, False, toy, progress=False, save_checkpoint=save_params)
    with pytest.raises(NammError, match="fields differ: population, samples_per_task"):
        evolve(recipe(population=10, samples_per_task=2), run_dir, True, toy, progress=False,
               save_checkpoint=save_params)
    result = evolve(recipe(), run_dir, True, toy, progress=False,
                    save_checkpoint=save_params)  # finished run: nothing to do
    assert result.generations == 6 and snapshot(run_dir) == baseline[1]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(NammError, match="not empty and holds no evolution run"):
        evolve(recipe(), tmp_path / "junk", True, toy, progress=False, save_checkpoint=save_params)
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


class _Overlapping(QuadraticEvaluator):
    def sample_pool(self, task, split):
        return [f"s{i}" for i in (range(10) if split == "train" else range(8, 12))]


def test_pool_errors(tmp_path):
    with pytest.raises(NammError, match="must be disjoint"):
        evolve(recipe(), tmp_path / "a", False, lambda: _Overlapping(n_params=N), progress=False,
               save_checkpoint=save_params)
    with pytest.raises(NammError, match=r"stages\[0\]\.tasks\[0\] \(a\) has 100 training samples"):
        evolve(recipe(samples_per_task=101), tmp_path / "b", False, toy, progress=False, save_checkpoint=save_params)


def test_plot_run(baseline, tmp_path):
    out = plot_run(baseline[0], tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(NammError, match="No evolution log"):
        plot_run(tmp_path, tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")
