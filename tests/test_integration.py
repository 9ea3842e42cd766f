"""Integration tests on the bundled real models (a few seconds each once the weights are cached)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import namm
from namm.cli import app
from namm.policies import H2O, Full, StreamingLLM

pytestmark = pytest.mark.integration

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, key: str, repeats: int = 30) -> str:
    half = FILLER * (repeats // 2)
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + half
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + half
        + "What is the pass key? The pass key is"
    )


def test_full_matches_transformers_on_smollm2(smollm2):
    model, tok = smollm2
    prompt = passkey_prompt(tok, "48213")
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] > 600
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = namm.generate(model, tok, prompt, Full(), max_new_tokens=8, delay=256, chunk_size=128, return_logits=True)
    assert out.token_ids == ref.sequences[0, ids.shape[1] :].tolist()[: len(out.token_ids)]
    torch.testing.assert_close(out.logits, torch.stack(ref.logits, 1)[:, : out.logits.shape[1]], rtol=1e-3, atol=2e-3)
    assert "48213" in out.text


def test_eviction_on_smollm2_frees_memory_and_keeps_the_passkey(smollm2):
    model, tok = smollm2
    prompt = passkey_prompt(tok, "70915")
    full = namm.generate(model, tok, prompt, Full(), max_new_tokens=8, delay=128)
    h2o = namm.generate(model, tok, prompt, H2O(budget=0.5), max_new_tokens=8, delay=128)
    assert "70915" in full.text
    assert h2o.stats.kv_bytes < 0.7 * full.stats.kv_bytes
    recency = namm.generate(model, tok, prompt, StreamingLLM(budget=64), max_new_tokens=8, delay=128)
    assert "70915" not in recency.text  # the needle is far outside the recent window


def test_gemma3_global_layers_only(tmp_path):
    model, tok = namm.load_model("gemma3-270m")
    prompt = passkey_prompt(tok, "31337", repeats=20)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    out = namm.generate(model, tok, prompt, Full(), max_new_tokens=4, delay=128)
    assert out.token_ids == ref[0, ids.shape[1] :].tolist()[: len(out.token_ids)]
    cache = namm.MemoryCache(model, H2O(budget=64), delay=128)
    assert len(cache.managed) == 3 and [lay.layer_idx for lay in cache.managed] == [5, 11, 17]


def test_demo_runs_on_the_bundled_model_and_keeps_each_length_apart(tmp_path, monkeypatch):
    """The README's main job, small: the bundled NAMM against every baseline and the distilled scorer; another
    --length gets its own directory instead of meeting the first run's records."""
    monkeypatch.chdir(tmp_path)
    for length in (300, 340):
        result = CliRunner().invoke(app, ["demo", "--length", str(length), "--samples", "1"])
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / f"runs/demo/smollm2-135m-{length}/passkey__results.json").read_text())
        labels = [r["label"] for r in saved["results"]]
        assert labels[:2] == ["full", "namm"] and len(labels) == 9 and "kvzip@namm-steps" in labels
        assert "distilled@namm-steps" in labels  # the probe-free scorer distilled from KVzip
        assert all(r["label"] == "full" or r["budget"] != "100%" for r in saved["results"])
