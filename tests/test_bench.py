"""``namm bench``: suites, resumable records, the statistics and the leaderboard (tiny model, fast)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import namm
from conftest import random_prompt, tiny_model, word_tokenizer
from namm.bench import load_suite, render, summarise
from namm.bench.leaderboard import learned_comparisons, load_records
from namm.bench.run import group_keys, records_file
from namm.cli import app
from namm.errors import NammError
from namm.policies import Full, SnapKV
from namm.scoring import answer_nll, gold_answer, sample_answer_nll
from namm.stats import mean_difference, paired_difference, relative_score
from namm.tasks import Sample, get_task

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small to share: one thread runs the quick suite ~10x faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- statistics ------------------------------------------------------------------------------------------------


def test_full_against_itself_is_exactly_one_with_interval_one():
    rng = np.random.default_rng(1)
    groups = [rng.integers(0, 2, size=n).astype(float) for n in (32, 16, 9)]
    groups[2][:] = 0.0  # a group where Full scores 0 is left out, not a division by zero
    iv = relative_score([np.stack([g, g], axis=1) for g in groups], resamples=500)
    assert (iv.estimate, iv.low, iv.high) == (1.0, 1.0, 1.0)
    nll = mean_difference([np.stack([g, g], axis=1) for g in groups], resamples=500)
    assert (nll.estimate, nll.low, nll.high) == (0.0, 0.0, 0.0)


def test_relative_score_is_the_mean_of_group_ratios_with_an_interval_around_it():
    a = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], dtype=float)  # 0.5 of Full
    b = np.array([[0.2, 0.4], [0.2, 0.4]])  # 0.5 of Full, no spread
    c = np.array([[1.0, 0.5], [0.0, 0.5]])  # 1.0
    iv = relative_score([a, b, c], resamples=2000, seed=3)
    assert iv.estimate == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert iv.low < iv.estimate < iv.high
    assert relative_score([a, b, c], resamples=2000, seed=3) == iv  # seeded
    assert not iv.excludes(0.7) and iv.excludes(1.5)
    assert np.isnan(relative_score([np.zeros((4, 2))]).estimate)  # Full scores 0 everywhere: undefined


def test_paired_difference_counts_and_interval():
    rng = np.random.default_rng(0)
    full = np.ones(60)
    a = (rng.random(60) < 0.9).astype(float)
    b = (rng.random(60) < 0.3).astype(float)
    p = paired_difference([np.stack([a, b, full], axis=1)], resamples=2000)
    assert p.wins == int((a > b).sum()) and p.losses == int((a < b).sum()) and p.ties == int((a == b).sum())
    assert p.difference.estimate == pytest.approx(a.mean() - b.mean())
    assert p.difference.excludes(0.0)  # 0.9 against 0.3 on 60 samples is a real difference
    same = paired_difference([np.stack([a, a, full], axis=1)], resamples=500)
    assert (same.difference.low, same.difference.high, same.wins, same.losses) == (0.0, 0.0, 0, 0)


# --- suites ----------------------------------------------------------------------------------------------------


def test_shipped_suites_load_and_hold_what_they_promise():
    quick, standard = load_suite("quick"), load_suite("standard")
    assert quick.cells[0].label == "full" and quick.cells[1].label == "namm"  # the NAMM before matched cells
    labels = {c.label for c in quick.cells}
    assert {"kvzip@0.5", "adakv@0.25", "tova@0.5", "pyramidkv@0.5", "snapkv@namm-steps", "namm@0.25"} <= labels
    budgeted = next(c for c in quick.cells if c.label == "namm@0.25")
    assert budgeted.policy == "namm" and budgeted.budget == 0.25 and budgeted.checkpoint == "smollm2-135m"
    sizes = {(t.task, t.lengths): t.samples for t in standard.tasks}
    for task in ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        assert sizes[(task, (2048,))] >= 32
    assert sizes[("passkey", (4096,))] >= 16 and sizes[("niah_single", (4096,))] >= 16
    longbench = [t for t in standard.tasks if t.samples is None]
    assert len(longbench) == 8
    assert all(s not in (0, 1000, 2000, 3000, 4242) for t in standard.tasks for s in t.seeds)
    assert {c.budget for c in standard.cells if c.budget is not None} == {0.25, 0.5}
    for name, mode in (("namm-results", "prompt"), ("namm-results-agnostic", "question-agnostic")):
        results = load_suite(name)  # issue 11's held-out evidence: the same tasks, both ways of asking
        assert results.mode == mode and {t.task for t in results.tasks} == {t.task for t in standard.tasks}
        assert {c.budget for c in results.cells if c.budget is not None} == {0.48}
        assert {c.allocation for c in results.cells} == {None, "smollm2-135m"}


def test_reconstruction_memory_suites_hold_the_issue_sizes():
    """The held-out evidence for the shipped memory (issue 11): 2k >= 32, 4k >= 16, every English MiniLongBench
    sample, all at 50% with Full, the memory, KVzip and the classic baselines, on seed 7000."""
    two_k, four_k, lb = load_suite("namm-recon-2k"), load_suite("namm-recon-4k"), load_suite("namm-recon-lb")
    for task in ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        assert {(t.task, t.lengths): t.samples for t in two_k.tasks}[(task, (2048,))] >= 32
    assert {t.task: t.samples for t in four_k.tasks} == {"passkey": 16, "niah_single": 16}
    assert all(t.lengths == (4096,) for t in four_k.tasks)
    assert len(lb.tasks) == 8 and all(t.samples is None and t.lengths == (2048,) for t in lb.tasks)
    for suite in (two_k, four_k, lb):
        labels = [c.label for c in suite.cells]
        assert labels[:2] == ["full", "namm@0.5"] and "kvzip@0.5" in labels
        namm_cells = [c for c in suite.cells if c.policy == "namm"]
        assert namm_cells[0].checkpoint == "smollm2-135m", "the shipped memory is the first NAMM cell"
        assert all(c.label == "namm-s8@0.5" for c in namm_cells[1:]), "the memory shipped before session 15"
        assert {"streaming@0.5", "snapkv@0.5", "h2o@0.5", "l2@0.5", "random@0.5"} <= set(labels)
        assert suite.mode == "prompt" and suite.delay == 128 and all(t.seeds == (7000,) for t in suite.tasks)
    agnostic = load_suite("namm-recon-2k-agnostic")
    assert agnostic.mode == "question-agnostic" and agnostic.delay == two_k.delay
    assert {t.task: t.samples for t in agnostic.tasks} == {t.task: 16 for t in two_k.tasks}
    assert [c.label for c in agnostic.cells][:3] == ["full", "namm@0.5", "namm-s8@0.5"]
    assert {c.label for c in agnostic.cells} == {c.label for c in two_k.cells} - {"adakv@0.5"}


def test_gemma_suite_at_the_issue_bound_differs_from_the_50_percent_one_only_in_its_budget():
    """namm-gemma-60 copies Full's records from namm-gemma (--reuse): the same model, tasks, seed, cadence and mode."""
    half, bound = load_suite("namm-gemma"), load_suite("namm-gemma-60")
    assert {c.budget for c in bound.cells if c.budget is not None} == {0.6}
    assert {c.policy for c in bound.cells} == {c.policy for c in half.cells}
    for field in ("model", "mode", "delay", "chunk_size", "tasks"):
        assert getattr(bound, field) == getattr(half, field), field


@pytest.mark.parametrize("path", sorted((Path(namm.__file__).parent / "suites").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_suite_loads(path):
    assert load_suite(path.stem).name == path.stem


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key"),
    ({"mode": "agnostic"}, "mode must be one of"),
    ({"policies": [{"name": "lru"}]}, "unknown policy 'lru'"),
    ({"policies": [{"name": "h2o", "budgets": [1.5]}]}, "fractional budget"),
    ({"policies": [{"name": "h2o", "budgets": ["namm"]}]}, "no unbudgeted 'namm' cell"),
    ({"policies": [{"name": "namm", "budgets": [0.5]}, {"name": "h2o", "budgets": ["namm"]}]},
     "no unbudgeted 'namm' cell"),
    ({"policies": [{"name": "namm", "budgets": ["namm"]}]}, "token count or a fraction"),
    ({"policies": [{"name": "namm", "budgets": [0.5]}, {"name": "namm", "budgets": ["50%"]}]}, "listed twice"),
    ({"tasks": [{"task": "passkey", "samples": 0}]}, "samples must be"),
    ({"delay": 100, "chunk_size": 30}, "divisor"),
    ({"policies": [{"name": "namm", "allocation": "x"}]}, "a NAMM has its own"),
    ({"policies": [{"name": "l2", "allocation": 3}]}, "allocation must name a NAMM checkpoint"),
    ({"policies": [{"name": "namm"}, {"name": "l2", "allocation": "x", "budgets": ["namm"]}]}, "not a budget matched"),
])
def test_bad_suites_are_one_line_errors(tmp_path, change, message):
    data = {"tasks": [{"task": "passkey", "lengths": [64], "samples": 2}], "policies": ["full", "h2o"]} | change
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(NammError, match=message) as err:
        load_suite(path)
    assert "\n" not in str(err.value)
    with pytest.raises(NammError, match="no shipped suite"):
        load_suite("no-such-suite")


def test_a_classic_cell_follows_a_checkpoints_depth_allocation(tmp_path):
    from namm.bench.run import _Policies
    from namm.memory import NAMM, NAMMConfig

    ckpt = tmp_path / "ckpt"
    policy = NAMM(NAMMConfig(budget=0.5, depth_knots=3, selection="per_head", spectral_norm="per_head"))
    params = policy.get_params()
    params[-3:] = torch.tensor([2.0, 0.0, -1.0])
    policy.set_params(params)
    policy.save_pretrained(ckpt)
    no_alloc = tmp_path / "plain"
    NAMM(NAMMConfig()).save_pretrained(no_alloc)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"task": "passkey", "lengths": [64], "samples": 1}], "policies": [
        "full", {"name": "streaming", "budgets": [0.25], "allocation": str(ckpt), "label": "streaming+depth"},
        {"name": "l2", "budgets": [0.25], "allocation": str(no_alloc)}]}))
    suite = load_suite(path)
    cell = next(c for c in suite.cells if c.label == "streaming+depth@0.25")
    assert cell.allocation == str(ckpt) and cell.policy == "streaming"
    sample = Sample(id="s0", task="passkey", prompt="p", answers=["a"], max_new_tokens=4)
    built = _Policies(tmp_path)(cell, "g", sample)
    assert built.budget == 0.25 and built.allocation.knots == (2.0, 0.0, -1.0)
    shares = built.allocation.fractions(0.25, 6)
    assert float(shares.mean()) == pytest.approx(0.25) and shares[0] > shares[-1]
    with pytest.raises(NammError, match="has no learned depth allocation"):
        _Policies(tmp_path)(next(c for c in suite.cells if c.label == "l2@0.25"), "g", sample)


# --- answer scoring --------------------------------------------------------------------------------------------


def test_gold_answer_and_answer_nll(llama, tokenizer):
    niah = get_task("niah_multivalue")
    s = Sample("x", "niah_multivalue", "ctx q: the values are", ["1", "2"], 8)
    assert gold_answer(s, niah) == " 1, 2" and gold_answer(s, get_task("passkey")) == " 1"
    assert gold_answer(Sample("y", "lcc", "code:\n", ["x = 1"], 8)) == "x = 1"
    prompt = random_prompt(50, seed=3)
    full = answer_nll(llama, tokenizer, prompt, " w4 w5 w6", Full(), delay=16)
    again = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=0, delay=16, answer=" w4 w5 w6")
    assert full == again.answer and full.tokens == 3 and full.mean_nll > 0
    sample = Sample("z", "echo", prompt + " w9", ["w4 w5 w6"], 2, context=prompt, question=" w9")
    qa = sample_answer_nll(llama, tokenizer, get_task("passkey"), sample, SnapKV(budget=8, window=4), delay=16,
                           question_agnostic=True)
    assert qa.tokens == 2  # capped at the sample's generation budget


# --- the command -----------------------------------------------------------------------------------------------


def _expected_groups(suite):
    return {g: [f"{g.split('-')[0]}-s7000-{i}" for i in range(4)] for g in group_keys(suite)}


def test_quick_suite_runs_end_to_end_and_resumes(model_dir, tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "--suite", "quick", "--model", str(model_dir), "--out", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    suite = load_suite("quick")
    for cell in suite.cells:
        for group, ids in _expected_groups(suite).items():
            recs = _lines(records_file(out, group, cell.label))
            assert [r["id"] for r in recs] == ids, (cell.label, group)
            for r in recs:
                assert {"score", "answer_logprob", "answer_nll", "answer_tokens", "cache_fraction", "seconds",
                        "setting"} <= set(r)
                assert r["answer_tokens"] >= 1 and r["answer_logprob"] < 0 and r["setting"]["group"] == group
                if cell.policy == "kvzip":
                    assert r["probe_seconds"] > 0
                if cell.budget == 0.25:
                    assert r["cache_fraction"] < 0.5
    page = (out / "leaderboard.md").read_text()
    for cell in suite.cells:
        assert f"| {cell.policy} | {cell.budget_text} |" in page
    assert "| full | 100% | n/a | +0.00 [+0.00, +0.00] | 1.00 [1.00, 1.00] | 100% | 1.00 | - | 1.00 | 8 |" in page
    assert (out / "leaderboard" / "quick-pareto.png").stat().st_size > 5000
    # a second run computes nothing; a run with another setting is refused without touching the records
    before = {p: p.read_bytes() for p in (out / "records").iterdir()}
    res = CliRunner().invoke(app, ["bench", "--suite", "quick", "--model", str(model_dir), "--out", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0 and "0 samples computed" in res.output
    changed = yaml.safe_load(load_suite("quick").path.read_text()) | {"delay": 64, "chunk_size": 64}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(changed))
    res = CliRunner().invoke(app, ["bench", "--suite", str(other), "--model", str(model_dir), "--out", str(out),
                                   "--no-progress"])
    assert res.exit_code == 2 and "another setting" in res.output and "delay 128 -> 64" in res.output
    assert {p: p.read_bytes() for p in (out / "records").iterdir()} == before


def test_a_run_killed_with_sigkill_resumes_without_losing_or_duplicating(model_dir, tmp_path):
    suite = tmp_path / "long.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "long", "delay": 64, "seeds": [7000],
        "tasks": [{"task": "passkey", "lengths": [256], "samples": 60}],
        "policies": ["full", {"name": "snapkv", "budgets": [0.5]}, {"name": "kvzip", "budgets": [0.5]}],
    }))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "namm.cli", "bench", "--suite", str(suite), "--model", str(model_dir),
           "--out", str(out), "--no-progress"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = records_file(out, "passkey-256-s7000", "full")
    deadline = time.time() + 600  # generous: the machine may be busy (the run is killed as soon as 5 records exist)
    while time.time() < deadline and (not first.exists() or first.read_bytes().count(b"\n") < 5):
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = sum(p.read_bytes().count(b"\n") for p in (out / "records").iterdir())
    assert 5 <= partial < 180
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = [f"passkey-s7000-{i}" for i in range(60)]
    for label in ("full", "snapkv@0.5", "kvzip@0.5"):
        recs = _lines(records_file(out, "passkey-256-s7000", label))  # every line parses: no torn record left
        assert [r["id"] for r in recs] == expected, label
    assert f"{180 - partial} samples computed" in done.stderr  # exactly the missing ones


def test_leaderboard_statistics_from_known_records(tmp_path):
    """The leaderboard's numbers on hand-made records: relative scores, the best baseline, the paired table."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy", "baselines": ["streaming", "snapkv"],
        "tasks": [{"task": "passkey", "lengths": [64], "samples": 20}, {"task": "niah_single", "lengths": [64],
                                                                           "samples": 20}],
        "policies": ["full", {"name": "streaming", "budgets": [0.5]}, {"name": "snapkv", "budgets": [0.5]},
                     {"name": "kvzip", "budgets": [0.5]}],
    }))
    suite = load_suite(path)
    rng = np.random.default_rng(0)
    rates = {"full": 1.0, "streaming@0.5": 0.5, "snapkv@0.5": 0.7, "kvzip@0.5": 0.95}
    for group in group_keys(suite):
        for label, rate in rates.items():
            file = records_file(tmp_path, group, label)
            file.parent.mkdir(parents=True, exist_ok=True)
            hits = rng.random(20) < rate if label != "full" else np.ones(20, dtype=bool)
            kvzip = label == "kvzip@0.5"
            file.write_text("".join(json.dumps({
                "id": str(i), "score": float(h), "answer_nll": 1.0 + (1 - rate),
                "cache_fraction": 1.0 if label == "full" else 0.5, "seconds": 2.0 if kvzip else 1.0,
                "peak_kv_bytes": 100, "probe_seconds": 0.5 if kvzip else 0.0}) + "\n" for i, h in enumerate(hits)))
    rows, comparisons = summarise(suite, load_records(suite, tmp_path))
    by = {r.cell.label: r for r in rows}
    assert (by["full"].relative.low, by["full"].relative.high) == (1.0, 1.0)
    rel = {label: r.relative.estimate for label, r in by.items()}
    assert rel["kvzip@0.5"] > rel["snapkv@0.5"] > rel["streaming@0.5"]
    assert by["kvzip@0.5"].time == 2.0 and by["kvzip@0.5"].probe_share == 0.25 and by["snapkv@0.5"].cache == 0.5
    assert by["kvzip@0.5"].nll.estimate == pytest.approx(0.05) and by["kvzip@0.5"].samples == 40
    paired = {c.cell.label: c for c in comparisons}
    assert set(paired) == {"kvzip@0.5", "streaming@0.5"} and paired["kvzip@0.5"].baseline.label == "snapkv@0.5"
    kv = paired["kvzip@0.5"]
    assert kv.paired.wins + kv.paired.ties + kv.paired.losses == 40 and kv.paired.wins > kv.paired.losses
    assert kv.samples == 40
    assert kv.paired.difference.estimate == pytest.approx(
        by["kvzip@0.5"].relative.estimate - by["snapkv@0.5"].relative.estimate)
    page = render(suite, tmp_path, tmp_path / "docs" / "leaderboard.md")
    text = page.read_text()
    assert "| kvzip | 50% | snapkv@0.5 |" in text and "![toy Pareto plot](leaderboard/toy-pareto.png)" in text
    # re-rendering replaces the section and keeps the rest of the page
    page.write_text(text + "\n<!-- kvpress-check:start -->\nkept\n<!-- kvpress-check:end -->\n")
    render(suite, tmp_path, page)
    again = page.read_text()
    assert again.count("bench-toy:start") == 1 and "kept" in again


def test_question_agnostic_suite_compresses_once_after_the_context(llama, tokenizer, tmp_path):
    from namm.bench import run_suite

    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump({
        "name": "qa", "mode": "question-agnostic", "delay": 512, "chunk_size": 128,
        "tasks": [{"task": "passkey", "lengths": [256], "samples": 2}],
        "policies": ["full", {"name": "kvzip", "budgets": [0.5]}, {"name": "snapkv", "budgets": [64]}],
    }))
    suite = load_suite(path)
    assert run_suite(suite, tmp_path, llama, tokenizer, progress=False).computed == 6
    samples = get_task("passkey").samples(2, seed=7000, length=256, tokenizer=tokenizer)
    for label in ("kvzip@0.5", "snapkv@64"):
        for rec, sample in zip(_lines(records_file(tmp_path, "passkey-256-s7000", label)), samples, strict=True):
            context = len(tokenizer(sample.context)["input_ids"])
            assert rec["setting"]["question_agnostic"] is True
            assert rec["memory_steps"] == [context]  # one step, at the end of the context
            assert [n for n, _ in rec["mean_kept_tokens_after_each_step"]] == [context]
            budget = context / 2 if label == "kvzip@0.5" else 64
            assert rec["mean_kept_tokens_after_steps"] == pytest.approx(budget, abs=1)
    res = CliRunner().invoke(app, ["bench", "--suite", "no-such-suite", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no shipped suite" in res.output and "Traceback" not in res.output


def _write_scores(suite, out, hits: dict[str, list[int]]) -> dict:
    """Write one record per sample with these scores for every cell label and group of ``suite``; load them back."""
    for group in group_keys(suite):
        for label, row in hits.items():
            file = records_file(out, group, label)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text("".join(json.dumps({
                "id": str(i), "score": float(h), "answer_nll": 1.0, "cache_fraction": 0.5, "seconds": 1.0,
                "peak_kv_bytes": 100}) + "\n" for i, h in enumerate(row)))
    return load_records(suite, out)


def test_the_learned_memory_is_paired_against_every_policy_at_its_budget(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy", "baselines": ["streaming"],
        "tasks": [{"task": "passkey", "lengths": [64], "samples": 12}],
        "policies": ["full", {"name": "namm", "budgets": [0.5]}, {"name": "streaming", "budgets": [0.5, 0.25]},
                     {"name": "kvzip", "budgets": [0.5]}],
    }))
    suite = load_suite(path)
    hits = {"full": [1] * 12, "namm@0.5": [1] * 11 + [0], "streaming@0.5": [1] * 6 + [0] * 6,
            "streaming@0.25": [0] * 12, "kvzip@0.5": [1] * 12}
    records = _write_scores(suite, tmp_path, hits)
    rows, _ = summarise(suite, records)
    learned = {c.baseline.label: c for c in learned_comparisons(suite, records, rows)}
    assert set(learned) == {"streaming@0.5", "kvzip@0.5"}  # same budget only, never Full or itself
    assert learned["streaming@0.5"].paired.difference.estimate == pytest.approx(11 / 12 - 6 / 12)
    assert learned["streaming@0.5"].paired.difference.excludes(0.0)
    assert (learned["kvzip@0.5"].paired.wins, learned["kvzip@0.5"].paired.losses) == (0, 1)
    assert not learned["kvzip@0.5"].paired.difference.excludes(0.0)
    text = render(suite, tmp_path, tmp_path / "page.md").read_text()
    assert "The learned memory against every other policy" in text and "| namm@0.5 | 50% | kvzip@0.5 |" in text


def test_two_learned_memories_are_paired_once_the_first_listed_first(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy", "baselines": ["streaming"],
        "tasks": [{"task": "passkey", "lengths": [64], "samples": 12}],
        "policies": ["full", {"name": "namm", "budgets": [0.5], "label": "evolved"},
                     {"name": "namm", "budgets": [0.5]}, {"name": "streaming", "budgets": [0.5]}],
    }))
    suite = load_suite(path)
    hits = {"full": [1] * 12, "evolved@0.5": [1] * 12, "namm@0.5": [1] * 10 + [0] * 2, "streaming@0.5": [0] * 12}
    records = _write_scores(suite, tmp_path, hits)
    rows, _ = summarise(suite, records)
    pairs = [(c.cell.label, c.baseline.label) for c in learned_comparisons(suite, records, rows)]
    assert pairs == [("evolved@0.5", "namm@0.5"), ("evolved@0.5", "streaming@0.5"), ("namm@0.5", "streaming@0.5")]
    first = learned_comparisons(suite, records, rows)[0]
    assert (first.paired.wins, first.paired.ties, first.paired.losses) == (2, 10, 0)


def test_records_of_another_run_are_reused_only_when_their_setting_is_exactly_this_suites(llama, tokenizer,
                                                                                           tmp_path):
    from namm.bench import run_suite

    def suite(name, policies, **extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "delay": 64, "chunk_size": 64, "tasks": [{"task": "passkey", "lengths": [192], "samples": 3}],
            "policies": policies} | extra))
        return load_suite(path)

    first = tmp_path / "first"
    assert run_suite(suite("a", ["full", {"name": "snapkv", "budgets": [0.5]}]), first, llama, tokenizer,
                     progress=False).computed == 6
    group = "passkey-192-s7000"
    bigger = suite("b", ["full", {"name": "snapkv", "budgets": [0.5]}, {"name": "streaming", "budgets": [0.5]}])
    second = tmp_path / "second"
    count = run_suite(bigger, second, llama, tokenizer, progress=False, reuse=[first], compute=False)
    assert (count.computed, count.reused, count.missing) == (0, 6, 3)
    for label in ("full", "snapkv@0.5"):
        theirs, ours = _lines(records_file(first, group, label)), _lines(records_file(second, group, label))
        assert [r | {"reused_from": str(first)} for r in theirs] == ours
    assert not records_file(second, group, "streaming@0.5").exists()
    # computing now runs only what no run had, and copies nothing twice
    count = run_suite(bigger, second, llama, tokenizer, progress=False, reuse=[first])
    assert (count.computed, count.reused, count.missing) == (3, 0, 0)
    assert [r["id"] for r in _lines(records_file(second, group, "full"))] == [f"passkey-s7000-{i}" for i in range(3)]
    # another cadence is another setting: nothing is copied
    count = run_suite(suite("c", ["full"], delay=32, chunk_size=32), tmp_path / "third", llama, tokenizer,
                      progress=False, reuse=[first], compute=False)
    assert (count.reused, count.missing) == (0, 3)
    with pytest.raises(NammError, match="output directory itself"):
        run_suite(bigger, second, llama, tokenizer, progress=False, reuse=[second])
    with pytest.raises(NammError, match="holds no records"):
        run_suite(bigger, second, llama, tokenizer, progress=False, reuse=[tmp_path / "nowhere"])


def test_bench_cli_reuses_another_run_and_says_what_it_copied(model_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["bench", "--suite", "quick", "--model", str(model_dir), "--no-progress"]
    assert CliRunner().invoke(app, [*base, "--out", str(first)]).exit_code == 0
    res = CliRunner().invoke(app, [*base, "--out", str(second), "--reuse", str(first), "--no-compute"])
    assert res.exit_code == 0, res.output
    total = sum(p.read_bytes().count(b"\n") for p in (first / "records").iterdir())
    assert f"0 samples computed, {total} copied from --reuse, 0 left to compute" in " ".join(res.output.split())
    page = " ".join((second / "leaderboard.md").read_text().split())
    assert f"{total} of the {total} records were copied from other runs" in page
    assert "copied from other runs" not in (first / "leaderboard.md").read_text()
    res = CliRunner().invoke(app, [*base, "--out", str(second), "--reuse", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "holds no records" in res.output and "Traceback" not in res.output
    # a run directory belongs to its suite: another suite neither renders over it nor runs into it
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(yaml.safe_load(load_suite("quick").path.read_text()) | {"name": "other"}))
    page_before = (first / "leaderboard.md").read_text()
    for extra in (["--render-only"], []):
        res = CliRunner().invoke(app, ["bench", "--suite", str(other), "--model", str(model_dir), "--no-progress",
                                       "--out", str(first), *extra])
        assert res.exit_code == 2 and "holds the run of suite 'quick'" in " ".join(res.output.split())
        assert "Traceback" not in res.output
    assert (first / "leaderboard.md").read_text() == page_before
    assert (first / "SUITE").read_text() == "quick\n"


def test_same_answer_as_full_is_the_share_of_word_for_word_equal_first_lines(tmp_path):
    """Full against itself is exactly 1 [1, 1]; a cell's share is the mean over groups; pairs are differenced."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy", "baselines": ["streaming"],
        "tasks": [{"task": "passkey", "lengths": [64], "samples": 10},
                  {"task": "niah_single", "lengths": [64], "samples": 10}],
        "policies": ["full", {"name": "namm", "budgets": [0.5]}, {"name": "streaming", "budgets": [0.5]}],
    }))
    suite = load_suite(path)
    same = {"full": [True] * 10, "namm@0.5": [True] * 8 + [False] * 2, "streaming@0.5": [True] * 3 + [False] * 7}
    for group in group_keys(suite):
        for label, row in same.items():
            file = records_file(tmp_path, group, label)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text("".join(json.dumps({
                "id": str(i), "score": 1.0, "answer_nll": 1.0, "cache_fraction": 0.5, "seconds": 1.0,
                "peak_kv_bytes": 100, "prediction": f" answer {i}\n" if s else f"answer {i + 1}"}) + "\n"
                for i, s in enumerate(row)))
    records = load_records(suite, tmp_path)
    rows, comparisons = summarise(suite, records)
    by = {r.cell.label: r for r in rows}
    assert (by["full"].same.estimate, by["full"].same.low, by["full"].same.high) == (1.0, 1.0, 1.0)
    assert by["namm@0.5"].same.estimate == pytest.approx(0.8)
    assert by["streaming@0.5"].same.estimate == pytest.approx(0.3)
    assert by["namm@0.5"].same.low < 0.8 < by["namm@0.5"].same.high
    paired = {c.cell.label: c for c in comparisons}
    assert paired["namm@0.5"].same.estimate == pytest.approx(0.5) and paired["namm@0.5"].same.excludes(0.0)
    # the scores tie everywhere, so only the new column tells the two apart
    assert paired["namm@0.5"].paired.ties == 20 and not paired["namm@0.5"].paired.difference.excludes(0.0)
    text = render(suite, tmp_path, tmp_path / "page.md").read_text()
    assert "| same answer as Full (95% CI) |" in text
    assert "| namm | 50% | 1.00 [1.00, 1.00] | +0.00 [+0.00, +0.00] | 0.80 [" in text
    assert "| 0 | 20 | 0 | **+0.50 [" in text


def test_same_answer_leaves_out_records_without_a_prediction():
    from namm.bench.leaderboard import same_answer

    assert same_answer({"prediction": " a "}, {"prediction": "a"}) == 1.0
    assert same_answer({"prediction": "a"}, {"prediction": "b"}) == 0.0
    # the answer is the first line: what follows it is left out, leading newlines are skipped
    assert same_answer({"prediction": " 57907.\nThe grass is green."}, {"prediction": "\n 57907.\nThe pass key"}) == 1.0
    assert np.isnan(same_answer({}, {"prediction": "b"}))
