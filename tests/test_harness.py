"""The evaluation harness and the eval/compare commands (tiny model, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import random_prompt
from namm.cli import app
from namm.errors import NammError
from namm.harness import compare, evaluate, read_records
from namm.policies import H2O, Full
from namm.tasks import Sample, Task


class EchoTask(Task):
    """Tiny task over the word tokenizer: any non-empty answer scores 1 unless it names the prompt's first word."""

    name = "echo"
    metric_name = "contains"
    max_new_tokens = 4

    def samples(self, n, *, seed=0, length=None, tokenizer=None, depth=None, offset=0):
        out = []
        for i in range(offset, offset + n):
            p = random_prompt(length or 60, seed=seed * 1000 + i)
            out.append(Sample(str(i), self.name, p, [p.split()[0]], self.max_new_tokens,
                              context=p[:-4], question=p[-4:]))
        return out

    def score(self, prediction, sample):
        return 0.5 if sample.answers[0] in prediction else float(bool(prediction.strip()))


def test_eval_resumes_without_duplicating(llama, tokenizer, tmp_path):
    task = EchoTask()
    samples = task.samples(4, length=50)
    out = tmp_path / "echo.jsonl"
    evaluate(llama, tokenizer, task, Full(), samples[:2], out_file=out, delay=16, progress=False)
    with out.open("a") as f:
        f.write('{"id": "torn')  # an interrupted write
    records = evaluate(llama, tokenizer, task, Full(), samples, out_file=out, delay=16, progress=False)
    on_disk = read_records(out)
    assert [r["id"] for r in on_disk] == ["0", "1", "2", "3"]
    assert [r["id"] for r in records] == ["0", "1", "2", "3"]
    assert all(set(r) >= {"prediction", "answers", "score", "kept_tokens_at_end", "seconds"} for r in on_disk)


def test_resume_refuses_records_of_another_setting(llama, tokenizer, tmp_path):
    task = EchoTask()
    out = tmp_path / "echo.jsonl"
    first = evaluate(llama, tokenizer, task, H2O(budget=0.5), task.samples(2, length=50), out_file=out, delay=16,
                     progress=False)
    assert set(first[0]["setting"]) == {"model", "prompt", "policy", "delay", "chunk_size", "question_agnostic",
                                        "max_new_tokens"}
    # the same setting resumes without recomputing
    again = evaluate(llama, tokenizer, task, H2O(budget=0.5), task.samples(2, length=50), out_file=out, delay=16,
                     progress=False)
    assert again == first and len(read_records(out)) == 2
    for what, kwargs in {
        "prompt": dict(policy=H2O(budget=0.5), samples=task.samples(2, length=60), delay=16),
        "policy": dict(policy=H2O(budget=0.25), samples=task.samples(2, length=50), delay=16),
        "delay": dict(policy=H2O(budget=0.5), samples=task.samples(2, length=50), delay=32),
    }.items():
        with pytest.raises(NammError, match=f"another setting.*{what}.*another --out"):
            evaluate(llama, tokenizer, task, kwargs["policy"], kwargs["samples"], out_file=out,
                     delay=kwargs["delay"], progress=False)
    assert len(read_records(out)) == 2, "a refused resume must not touch the file"
    # a NAMM's fingerprint follows its weights, not just its config
    a, b = _evicting_namm(0), _evicting_namm(1)
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == _evicting_namm(0).fingerprint()
    # records written before settings existed are still reused
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "setting"}) + "\n" for r in first))
    kept = evaluate(llama, tokenizer, task, Full(), task.samples(2, length=50), out_file=legacy, delay=16,
                    progress=False)
    assert [r["prediction"] for r in kept] == [r["prediction"] for r in first]


def test_compare_full_against_itself_is_exactly_one(llama, tokenizer, tmp_path):
    task = EchoTask()
    samples = task.samples(3, length=70)
    rows = compare(llama, tokenizer, task, samples, ["full", "h2o"], [0.5], tmp_path, delay=16, progress=False)
    by = {r["label"]: r for r in rows}
    assert by["full"]["score"] > 0 and by["full"]["relative"] == 1.0
    assert by["h2o@0.5"]["cache_fraction"] < by["full"]["cache_fraction"] == 1.0
    saved = json.loads((tmp_path / "echo__results.json").read_text())
    assert [r["label"] for r in saved["results"]] == ["full", "h2o@0.5"]
    assert (tmp_path / "echo__results.png").stat().st_size > 1000


def _evicting_namm(seed: int = 0):
    import namm

    policy = namm.NAMM()
    policy.set_params(torch.randn(policy.n_params, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return policy


def test_match_budget_gives_baselines_the_namm_cache_at_every_step(llama, tokenizer, tmp_path):
    task = EchoTask()
    samples = task.samples(2, length=80)
    rows = compare(llama, tokenizer, task, samples, ["namm", "h2o", "streaming"], [], tmp_path, match_budget="namm",
                   namm_policy=_evicting_namm(), delay=16, progress=False)
    namm_recs = read_records(tmp_path / "echo__namm.jsonl")
    assert all(len(r["mean_kept_tokens_after_each_step"]) >= 3 for r in namm_recs)
    assert any(k < n for r in namm_recs for n, k in r["mean_kept_tokens_after_each_step"])  # the NAMM did evict
    for label in ("h2o@namm-steps", "streaming@namm-steps"):
        for a, b in zip(namm_recs, read_records(tmp_path / f"echo__{label}.jsonl"), strict=True):
            steps_a, steps_b = a["mean_kept_tokens_after_each_step"], b["mean_kept_tokens_after_each_step"]
            assert [n for n, _ in steps_a] == [n for n, _ in steps_b]
            for (_, ka), (_, kb) in zip(steps_a, steps_b, strict=True):
                assert abs(ka - kb) <= 1.0  # same cache size after every memory step, up to rounding
            assert abs(a["mean_kv_tokens"] - b["mean_kv_tokens"]) <= 1.0
    by = {r["label"]: r for r in rows}
    assert set(by) == {"full", "namm", "h2o@namm-steps", "streaming@namm-steps"}
    assert by["h2o@namm-steps"]["budget"] == "matched to namm, per step"


def test_match_budget_namm_mean_is_the_papers_fixed_budget(llama, tokenizer, tmp_path):
    task = EchoTask()
    samples = task.samples(2, length=80)
    rows = compare(llama, tokenizer, task, samples, ["namm", "h2o"], [], tmp_path, match_budget="namm-mean",
                   namm_policy=_evicting_namm(), delay=16, progress=False)
    namm_recs = read_records(tmp_path / "echo__namm.jsonl")
    h2o_recs = read_records(tmp_path / "echo__h2o@namm.jsonl")
    for a, b in zip(namm_recs, h2o_recs, strict=True):
        assert abs(a["mean_kept_tokens_after_steps"] - b["mean_kept_tokens_after_steps"]) <= 1.0 \
            or a["mean_kept_tokens_after_steps"] < 1
    assert {r["label"] for r in rows} == {"full", "namm", "h2o@namm"}


def _legacy_record(record: dict) -> dict:
    """A record as the harness wrote it before namm.summary: no version, the sizes under their old names."""
    names = {"kept_tokens_at_end": "kept_tokens", "mean_kept_tokens_after_steps": "mean_kept_tokens",
             "mean_kept_tokens_after_each_step": "kept_per_step"}
    return {names.get(k, k): v for k, v in record.items() if k != "summary_version"}


def test_match_budget_reads_old_records_and_refuses_bad_modes(llama, tokenizer, tmp_path):
    task = EchoTask()
    samples = task.samples(1, length=40)
    with pytest.raises(NammError, match="--match-budget must be one of"):
        compare(llama, tokenizer, task, samples, ["namm", "h2o"], [], tmp_path, match_budget="h2o",
                namm_policy=_evicting_namm(), delay=16, progress=False)
    compare(llama, tokenizer, task, samples, ["namm"], [], tmp_path, namm_policy=_evicting_namm(), delay=16,
            progress=False)
    file = tmp_path / "echo__namm.jsonl"
    new = [json.loads(line) for line in file.read_text().splitlines()]
    legacy = [_legacy_record(r) for r in new]  # as written before namm.summary (version 1)
    file.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    rows = compare(llama, tokenizer, task, samples, ["namm", "h2o"], [], tmp_path, match_budget="namm",
                   namm_policy=_evicting_namm(), delay=16, progress=False)  # old records resume, read by old names
    assert read_records(file) == legacy and {r["label"] for r in rows} == {"full", "namm", "h2o@namm-steps"}
    h2o = read_records(tmp_path / "echo__h2o@namm-steps.jsonl")[0]
    assert [n for n, _ in h2o["mean_kept_tokens_after_each_step"]] == [n for n, _ in legacy[0]["kept_per_step"]]
    file.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kept_per_step"}) + "\n" for r in legacy))
    with pytest.raises(NammError, match="predates per-step cache sizes"):
        compare(llama, tokenizer, task, samples, ["namm", "h2o"], [], tmp_path, match_budget="namm",
                namm_policy=_evicting_namm(), delay=16, progress=False)


def test_question_agnostic_needs_a_split(llama, tokenizer, tmp_path):
    task = EchoTask()
    bad = Sample("x", "echo", random_prompt(20), ["w3"], 2)
    with pytest.raises(NammError, match="question-agnostic"):
        evaluate(llama, tokenizer, task, H2O(budget=4), [bad], question_agnostic=True, progress=False)
    rec = evaluate(llama, tokenizer, task, H2O(budget=8), task.samples(1, length=40), delay=16,
                   question_agnostic=True, progress=False)
    assert rec[0]["prompt_tokens"] > 30


def test_cli_bad_input_is_one_clear_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--task", "no_such_task", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Unknown task" in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())  # nothing half-written
    res = runner.invoke(app, ["generate", "--policy", "lru", "--prompt", "hi"])
    assert res.exit_code == 2 and "Unknown policy" in res.output
    res = runner.invoke(app, ["generate", "--policy", "h2o", "--budget", "zero", "--prompt", "hi"])
    assert res.exit_code == 2 and "--budget" in res.output


def _count_runs(monkeypatch):
    """Count the samples actually generated (records reused from a file are not)."""
    import namm.harness as harness

    calls = []
    real = harness.run_sample

    def counted(model, tokenizer, task, sample, *args, **kwargs):
        calls.append(sample.id)
        return real(model, tokenizer, task, sample, *args, **kwargs)

    monkeypatch.setattr(harness, "run_sample", counted)
    return calls


def test_resume_keeps_every_valid_record_around_a_corrupt_middle_line(llama, tokenizer, tmp_path, monkeypatch,
                                                                       capsys):
    task = EchoTask()
    samples = task.samples(4, length=40)
    out = tmp_path / "echo.jsonl"
    first = evaluate(llama, tokenizer, task, Full(), samples[:3], out_file=out, delay=16, progress=False)
    good = out.read_text().splitlines()
    out.write_text("\n".join([good[0], '{"id": "1", "predic', *good[1:]]) + "\n")  # damage between records
    capsys.readouterr()
    calls = _count_runs(monkeypatch)
    records = evaluate(llama, tokenizer, task, Full(), samples, out_file=out, delay=16, progress=False)
    assert calls == ["3"]  # the three valid records were reused, none recomputed
    assert records[:3] == first and [r["id"] for r in records] == ["0", "1", "2", "3"]
    assert [r["id"] for r in read_records(out)] == ["0", "1", "2", "3"]
    assert (tmp_path / "echo.jsonl.bad").read_text() == '{"id": "1", "predic\n'  # set aside, not deleted
    err = capsys.readouterr().err
    assert "1 unreadable line" in err and "echo.jsonl.bad" in err
    assert "3 of 4 samples already recorded, reused" in err


def test_resume_after_a_record_without_its_final_newline(llama, tokenizer, tmp_path, monkeypatch):
    task = EchoTask()
    samples = task.samples(3, length=40)
    out = tmp_path / "echo.jsonl"
    first = evaluate(llama, tokenizer, task, Full(), samples[:2], out_file=out, delay=16, progress=False)
    out.write_text(out.read_text().rstrip("\n"))  # e.g. written by another tool, or an editor
    calls = _count_runs(monkeypatch)
    records = evaluate(llama, tokenizer, task, Full(), samples, out_file=out, delay=16, progress=False)
    assert calls == ["2"] and records[:2] == first
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["0", "1", "2"]  # valid JSON lines
    again = evaluate(llama, tokenizer, task, Full(), samples, out_file=out, delay=16, progress=False)
    assert calls == ["2"] and again == records  # the next rerun keeps (and reuses) all three


def test_compare_checks_its_settings_before_the_full_cache_runs(llama, tokenizer, tmp_path, monkeypatch):
    task = EchoTask()
    samples = task.samples(2, length=40)
    calls = _count_runs(monkeypatch)
    bad = [
        (dict(policies=["full", "lru"], budgets=[0.5]), "Unknown policy 'lru'"),
        (dict(policies=["h2o"], budgets=[0.5], match_budget="bogus"), "--match-budget must be one of"),
        (dict(policies=["h2o"], budgets=[0]), "budget must be at least 1 token"),
        (dict(policies=["h2o"], budgets=[500]), "above the context"),
        (dict(policies=["h2o"], budgets=[]), "at least one --budget"),
        (dict(policies=["h2o", "namm"], budgets=[0.5]), "needs a checkpoint"),
        (dict(policies=["h2o"], budgets=[0.5], match_budget="namm"), "needs namm among --policies"),
    ]
    for kwargs, message in bad:
        with pytest.raises(NammError, match=message):
            compare(llama, tokenizer, task, samples, out_dir=tmp_path / "out", delay=16, progress=False, **kwargs)
    assert calls == [] and not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_budgets_that_mean_the_same_share_one_result_and_read_uniformly(llama, tokenizer, tmp_path):
    task = EchoTask()
    rows = compare(llama, tokenizer, task, task.samples(1, length=40), ["full", "h2o", "H2O"], [0.5, 0.5, 8],
                   tmp_path, delay=16, progress=False)
    assert [(r["label"], r["budget"]) for r in rows] == [("full", "100%"), ("h2o@0.5", "50%"),
                                                         ("h2o@8", "8 tokens")]
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["echo__full.jsonl", "echo__h2o@0.5.jsonl",
                                                                 "echo__h2o@8.jsonl"]
    record = read_records(tmp_path / "echo__h2o@8.jsonl")[0]
    assert all(isinstance(v, int) for row in record["kept_tokens_at_end"] for v in row)  # token counts, not floats
