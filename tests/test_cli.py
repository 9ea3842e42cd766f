"""The command line on a tiny model saved to a local directory (the code path users take with hub ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import random_prompt, tiny_model, unwritable_dir, word_tokenizer
from namm.cli import app
from namm.errors import NammError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_generate_json_reports_the_cache(model_dir, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(random_prompt(120, seed=3))
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "h2o", "--budget", "16",
                                   "--delay", "32", "--prompt-file", str(prompt), "--max-new-tokens", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"text", "kept_tokens_at_end", "total_tokens", "kv_bytes", "peak_kv_bytes", "seconds"} <= set(out)
    assert out["total_tokens"] == 125
    kept = out["kept_tokens_at_end"]
    assert len(kept) == 3 and all(v <= 16 + 32 for row in kept for v in row)
    assert out["mean_kept_tokens_at_end"] == sum(map(sum, kept)) / sum(map(len, kept))
    assert out["memory_steps"] == [32, 64, 96, 120] and out["summary_version"] == 2
    assert out["mean_kept_tokens_after_steps"] == 16  # the budget, right after every step
    assert out["peak_kv_bytes"] >= out["kv_bytes"] and out["peak_kv_tokens"] == 16 + 32


def test_generate_with_a_namm_checkpoint(model_dir, tmp_path):
    import namm

    ckpt = tmp_path / "ckpt"
    saved = namm.NAMM(namm.NAMMConfig(selection="per_head"))  # not the default: the checkpoint must be what runs
    saved.save_pretrained(ckpt)
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint",
                                   str(ckpt), "--delay", "32", "--prompt", random_prompt(70), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["policy"] == saved.describe() and "per_head selection" in out["policy"]
    assert out["memory_steps"] == [32, 64, 96, 128]  # the NAMM ran its memory steps at --delay
    assert len(out["mean_kept_tokens_after_each_step"]) == 4
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint",
                                   str(tmp_path / "missing"), "--prompt", "w5"])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_generate_with_a_namm_checkpoint_at_a_budget(model_dir, tmp_path):
    import namm

    ckpt = tmp_path / "ckpt"
    namm.NAMM(namm.NAMMConfig(delay=32)).save_pretrained(ckpt)
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint",
                                   str(ckpt), "--budget", "25%", "--prompt", random_prompt(80), "--max-new-tokens",
                                   "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "budget 25%" in out["policy"]
    assert all(v == 20 for row in out["kept_tokens_at_end"] for v in row)  # the end-of-prompt step: 25% of 80 tokens
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint",
                                   str(ckpt), "--budget", "2.5", "--prompt", "w5"])
    assert res.exit_code == 2 and "budget" in res.output and "Traceback" not in res.output


def test_policies_lists_every_policy():
    from namm.policies import registered

    res = CliRunner().invoke(app, ["policies"])
    assert res.exit_code == 0
    lines = [line for line in res.stdout.splitlines() if line.startswith("│")]  # the table's body
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines]
    rows = [(name, cls) for name, cls, *_ in cells if name]  # continuation lines of wrapped cells have no name
    assert rows == sorted((name, cls.__name__) for name, cls in registered().items())
    assert {"full", "streaming", "h2o", "l2", "snapkv", "random", "namm"} <= {name for name, _ in rows}


# --- every mistake: one line, exit code 2, before any model loads or any file is written ----------------------

@pytest.fixture
def no_model(monkeypatch):
    """Record model loads: a refused command must not have loaded one."""
    import namm.cli

    loads = []
    monkeypatch.setattr(namm.cli, "_load", lambda name: loads.append(name) or pytest.fail("the model was loaded"))
    return loads


def refused(args, message, env=None):
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in res.output and res.stdout == ""
    return lines[0]


def test_generate_mistakes_are_refused_before_the_model_loads(no_model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("w5 w6")
    gen = ["generate", "--model", "somewhere"]
    refused([*gen, "--prompt-file", str(tmp_path)], "is a directory")
    refused([*gen, "--prompt-file", str(tmp_path / "none.txt")], "does not exist")
    refused([*gen, "--prompt", "w5", "--prompt-file", str(prompt)], "either --prompt or --prompt-file, not both")
    refused([*gen, "--prompt", "w5", "--policy", "h2o", "--namm-checkpoint", "smollm2-135m"],
            "--namm-checkpoint applies to --policy namm only")
    for delay in ("0", "-4"):
        refused([*gen, "--prompt", "w5", "--delay", delay], f"--delay must be at least 1, got {delay}")
    refused([*gen, "--prompt", "w5", "--chunk-size", "0"], "--chunk-size must be a positive divisor of --delay")
    refused([*gen, "--prompt", "w5", "--delay", "64", "--chunk-size", "48"], "--chunk-size must be a positive divisor")
    refused([*gen, "--prompt", "w5", "--policy", "h2o", "--budget", "2.5"], "--budget 2.5")
    refused([*gen, "--prompt", "w5", "--policy", "h2o", "--budget", "0"], "--budget must be positive")
    refused([*gen, "--prompt", "w5", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 0")
    assert no_model == []


def test_budgets_parse_as_tokens_or_fractions():
    from namm.cli import parse_budget

    assert [parse_budget(t) for t in ("256", "1e3", "256.0", "+8", "0.25", "25%", "1.0", "100%", "1e-1")] == [
        256, 1000, 256, 8, 0.25, 0.25, 1.0, 1.0, 0.1]
    assert isinstance(parse_budget("1e3"), int) and isinstance(parse_budget("1.0"), float)
    for bad in ("zero", "0", "-3", "2.5", "150%", "0%", "nan", "inf", ""):
        with pytest.raises(NammError, match="--budget"):
            parse_budget(bad)


def test_eval_mistakes_are_refused_before_any_work(no_model, tmp_path):
    ev = ["eval", "--model", "somewhere", "--task", "passkey"]
    out = tmp_path / "out"
    refused([*ev, "--samples", "0", "--out", str(out)], "--samples must be at least 1, got 0")
    refused([*ev, "--samples", "-1", "--out", str(out)], "--samples must be at least 1, got -1")
    refused([*ev, "--delay", "0", "--out", str(out)], "--delay must be at least 1")
    refused([*ev, "--chunk-size", "0", "--out", str(out)], "--chunk-size")
    refused([*ev, "--no-truncate", "--out", str(out)], "--no-truncate applies to LongBench tasks")
    refused(["eval", "--task", "no_such_task", "--out", str(out)], "Unknown task 'no_such_task'")
    refused([*ev, "--policy", "h2o", "--namm-checkpoint", "x", "--out", str(out)], "--namm-checkpoint applies")
    assert not out.exists()  # flags are checked before the output directory is made
    file = tmp_path / "file"
    file.write_text("")
    refused([*ev, "--out", str(file)], f"--out {file} is a file")
    ro = unwritable_dir(tmp_path)
    refused([*ev, "--out", str(ro)], "is not a writable directory")
    line = refused(["eval", "--task", "qasper", "--out", str(out)], "/nowhere",
                   env={"NAMM_LONGBENCH_DIR": "/nowhere", "NAMM_LONGBENCH_SOURCE": None})
    assert "export NAMM_LONGBENCH_DIR=" in line and "NAMM_LONGBENCH_SOURCE=hub" in line  # fixes for a shell user
    assert no_model == []


def test_compare_mistakes_are_refused_before_the_full_cache_runs(no_model, tmp_path):
    cmp = ["compare", "--model", "somewhere", "--out", str(tmp_path / "out")]
    refused([*cmp, "--policies", "full,lru"], "Unknown policy 'lru'")
    refused([*cmp, "--match-budget", "bogus"], "--match-budget must be one of namm, namm-mean")
    refused([*cmp, "--budget", "0"], "--budget must be positive")
    refused([*cmp, "--policies", "h2o", "--match-budget", "namm"], "needs namm among --policies")
    refused([*cmp, "--policies", "h2o", "--namm-checkpoint", "smollm2-135m"], "only used when namm is among")
    refused([*cmp, "--samples", "0"], "--samples must be at least 1")
    refused([*cmp, "--task", "passkey,nope"], "Unknown task 'nope'")
    assert no_model == [] and not (tmp_path / "out").exists()


def test_evolve_recipe_mistakes_leave_no_run_directory(no_model, tmp_path):
    import yaml

    base = {"model": "smollm2-135m", "delay": 64, "chunk_size": 32, "population": 4,
            "stages": [{"name": "s", "generations": 1, "tasks": [{"name": "passkey", "options": {"length": 128}}]}]}
    cases = [
        ({"stages": [{"name": "s", "generations": 1, "tasks": ["passkee"]}]}, "stages[0].tasks[0]': Unknown task"),
        ({"stages": [{"name": "s", "generations": 1, "tasks": [{"name": "passkey", "options": {"lenght": 9}}]}]},
         "does not take option(s) lenght"),
        ({"stages": [{"name": "s", "generations": 1, "tasks": [{"name": "passkey", "options": {"length": -9}}]}]},
         "length must be a positive number"),
        ({"chunk_size": 48}, "'chunk_size': must divide delay (64)"),
        ({"population": 2}, "'population': expected an integer >= 3"),
        ({"policy": {"delay": 32}}, "'policy.delay': 32 differs from delay (64)"),
        ({"policy": {"hop": 24}}, "recipe field 'policy': NAMMConfig.delay must be a positive multiple of hop=24"),
    ]
    for change, message in cases:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({**base, **change}))
        run_dir = tmp_path / "run"
        refused(["evolve", "--config", str(recipe), "--run-dir", str(run_dir)], message)
        assert not run_dir.exists()  # so the corrected recipe can start there
    recipe.write_text(yaml.safe_dump(base))
    refused(["evolve", "--config", str(tmp_path)], "is a directory")
    refused(["evolve", "--config", str(recipe), "--resume", str(tmp_path / "none")], "holds no evolution run")
    refused(["evolve", "--resume", str(tmp_path / "none")], "holds no evolution run")  # its recipe.yaml by default
    refused(["evolve"], "Give --config")
    assert no_model == []


def test_evolve_plot_writes_into_a_new_folder_and_refuses_a_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    record = {"stage": "s", "stage_index": 0, "generation": 1, "best": 0.5, "mean": 0.4, "median": 0.4,
              "cache_fraction": 0.5, "sigma": 0.06}
    (run / "log.jsonl").write_text(json.dumps(record) + "\n")
    target = tmp_path / "missing" / "deeper" / "fit.png"
    res = CliRunner().invoke(app, ["evolve-plot", str(run), "--out", str(target)])
    assert res.exit_code == 0, res.output
    assert target.stat().st_size > 1000
    (tmp_path / "file").write_text("")
    refused(["evolve-plot", str(run), "--out", str(tmp_path / "file" / "fit.png")], "--out")
    refused(["evolve-plot", str(tmp_path / "none")], "has no log.jsonl")


def test_a_mistyped_model_name_fails_fast_and_quietly(monkeypatch, caplog):
    import time

    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    import namm

    start = time.perf_counter()
    with pytest.raises(NammError, match="Did you mean 'smollm2-135m'") as err:  # real lookup: offline here
        namm.load_model("smollm2-135")
    assert time.perf_counter() - start < 15 and "Retrying" not in caplog.text
    assert "not a bundled model (smollm2-135m, gemma3-270m)" in str(err.value)

    def missing(self, repo_id, **kwargs):  # what the hub answers for a model it does not have
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, f"404 Client Error: Repository Not Found for {repo_id}")
        raise err

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(NammError, match="hub has no model of that name. Did you mean 'gemma3-270m'"):
        namm.load_model("Gemma3-270")
    with pytest.raises(NammError, match="not a valid Hugging Face model id"):
        namm.load_model("two words")
    res = CliRunner().invoke(app, ["generate", "--model", "smollm2-135", "--prompt", "hi"])
    assert res.exit_code == 2 and "Did you mean 'smollm2-135m'" in res.stderr and len(res.stderr.splitlines()) == 1


def test_an_existing_hub_id_goes_on_to_transformers(monkeypatch):
    import huggingface_hub

    from namm.models import check_hub_id

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: object())
    assert check_hub_id("some-org/some-model") is None


# --- budgets honoured, cadences, clean output -------------------------------------------------------------------

def test_generate_honours_a_budget_on_a_prompt_shorter_than_the_cadence(model_dir):
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "h2o", "--budget", "16",
                                   "--prompt", random_prompt(120, seed=5), "--max-new-tokens", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["delay"] == 512 and out["memory_steps"] == [120]  # the step at the end of the prompt
    assert all(isinstance(v, int) and v <= 16 for row in out["kept_tokens_at_end"] for v in row)
    assert out["policy"] == "h2o (budget 16 tokens)"


def test_a_namm_checkpoint_brings_its_own_cadence(model_dir, tmp_path):
    import namm

    ckpt = tmp_path / "ckpt"
    namm.NAMM(namm.NAMMConfig(delay=32)).save_pretrained(ckpt)
    args = ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint", str(ckpt),
            "--prompt", random_prompt(70), "--max-new-tokens", "2", "--json"]
    out = json.loads(CliRunner().invoke(app, args).stdout)
    assert out["delay"] == 32 and out["memory_steps"] == [32, 64]
    assert json.loads(CliRunner().invoke(app, [*args, "--delay", "64"]).stdout)["delay"] == 64
    refused([*args, "--option", "x=1"], "takes no --option")


def test_no_warning_or_loading_bar_reaches_the_user(model_dir, capfd):
    import warnings

    import namm

    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning from our calls (or a dependency's) fails the test
        model, tok = namm.load_model(str(model_dir))
        namm.generate(model, tok, random_prompt(40), namm.policies.H2O(budget=8), max_new_tokens=3, delay=16)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_eval_resumes_aloud_with_one_result_file_per_budget(model_dir, tmp_path):
    args = ["eval", "--model", str(model_dir), "--task", "passkey", "--policy", "h2o", "--samples", "1",
            "--max-length", "96", "--delay", "32", "--out", str(tmp_path)]
    first = CliRunner().invoke(app, [*args, "--budget", "25%"])
    assert first.exit_code == 0, first.output
    assert "1 sample " in first.stdout and "vs full" not in first.stdout and "nan" not in first.stdout
    assert "25%" in first.stdout and "1/1" in first.stderr and "1/1" not in first.stdout  # progress on stderr
    again = CliRunner().invoke(app, [*args, "--budget", "0.25"])
    assert again.exit_code == 0, again.output
    assert "1 of 1 sample already recorded, reused" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["passkey__h2o@0.25.jsonl"]


def test_help_is_instant_wide_and_lists_the_tasks(tmp_path):
    import subprocess
    import sys

    import namm

    src = str(Path(namm.__file__).resolve().parents[1])
    code = ("import sys; from typer.testing import CliRunner; import namm.cli as c; r = CliRunner(); "
            "out = [r.invoke(c.app, a).output for a in (['--help'], ['eval', '--help'], ['compare', '--help'])]; "
            "bad = r.invoke(c.app, ['generate', '--delay', 'x']); "
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "print(repr((heavy, bad.exit_code, out[1])))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    heavy, code, eval_help = eval(res.stdout)
    assert heavy == [] and code == 2, res.stderr
    assert "passage_retrieval_en" in eval_help and "…" not in eval_help  # every task listed, nothing cut off
    assert "--no-no-truncate" not in eval_help and "--no-truncate" in eval_help


def test_compare_table_reads_cleanly(model_dir, tmp_path):
    args = ["compare", "--model", str(model_dir), "--task", "passkey", "--policies", "full,h2o", "--budget",
            "25%,0.25,16", "--samples", "1", "--max-length", "96", "--delay", "32", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "1 sample" in res.stdout and "1 samples" not in res.stdout and "nan" not in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[2].strip() for row in rows] == ["100%", "25%", "16 tokens"]  # one budget style
    saved = json.loads((tmp_path / "passkey__results.json").read_text())
    assert [r["label"] for r in saved["results"]] == ["full", "h2o@0.25", "h2o@16"]
    assert "peak KV MiB" in res.stdout  # bytes stored, not the longest head's tokens
    full, *evicting = (r["peak_kv_mib"] for r in saved["results"])
    assert all(0 < p < full for p in evicting)
    again = CliRunner().invoke(app, args)
    assert again.stderr.count("1 of 1 sample already recorded, reused") == 3
