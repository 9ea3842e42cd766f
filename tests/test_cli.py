"""The command line on a tiny model saved to a local directory (the code path users take with hub ids)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import random_prompt, tiny_model, word_tokenizer
from namm.cli import app


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
    assert {"text", "kept_tokens", "total_tokens", "kv_bytes", "peak_kv_bytes", "seconds"} <= set(out)
    assert out["total_tokens"] == 125
    assert len(out["kept_tokens"]) == 3 and all(v <= 16 + 32 for row in out["kept_tokens"] for v in row)
    assert out["peak_kv_bytes"] >= out["kv_bytes"] and out["peak_kv_tokens"] == 16 + 32


def test_generate_with_a_namm_checkpoint(model_dir, tmp_path):
    import namm

    ckpt = tmp_path / "ckpt"
    namm.NAMM().save_pretrained(ckpt)
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint",
                                   str(ckpt), "--delay", "32", "--prompt", random_prompt(70), "--json"])
    assert res.exit_code == 0, res.output
    assert "namm" in json.loads(res.stdout.strip().splitlines()[-1])["policy"]
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--policy", "namm", "--namm-checkpoint",
                                   str(tmp_path / "missing"), "--prompt", "w5"])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_policies_lists_every_policy():
    res = CliRunner().invoke(app, ["policies"])
    assert res.exit_code == 0
    for name in ["full", "streaming", "h2o", "l2", "snapkv", "random", "namm"]:
        assert name in res.stdout
