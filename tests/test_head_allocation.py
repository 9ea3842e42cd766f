"""Per-head allocations: exact means over every (layer, head), floors, per-head budgets at run time, checkpoints."""

from __future__ import annotations

import pytest
import torch

import namm
from conftest import random_prompt, tiny_model
from namm.errors import NammError
from namm.memory import NAMM, NAMMConfig, param_count
from namm.policies import StreamingLLM
from namm.policies.allocation import HeadAllocation, allocate_heads, fit_head_logits, water_fill
from namm.policies.selection import head_adaptive_keep, top_k_keep


@pytest.mark.parametrize("mean", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("floor", [0.0, 0.03, 0.2])
def test_head_fractions_average_to_the_budget_and_respect_the_floor(mean, floor):
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(3)) * 3
    frac = allocate_heads(logits, mean, floor)[0]
    assert frac.shape == (6, 3)
    assert abs(float(frac.mean()) - mean) < 1e-12
    assert bool((frac <= 1.0).all()) and bool((frac >= min(floor, mean) - 1e-12).all())
    order = logits.flatten().argsort()
    assert bool((frac.flatten()[order].diff() >= -1e-12).all())  # a higher logit never gets less


def test_water_fill_caps_and_redistributes():
    frac = water_fill(torch.tensor([[10.0, 0.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([0.5],
                                                                                                   dtype=torch.float64))
    assert float(frac[0, 0]) == 1.0 and torch.allclose(frac[0, 1:], torch.full((3,), 1.0 / 3, dtype=torch.float64))


def test_fitted_logits_rank_heads_by_score():
    scores = torch.tensor([[0.5, 0.01], [0.2, 0.0]])
    logits = fit_head_logits(scores, temperature=0.5)
    assert logits.flatten().argsort().tolist() == [3, 1, 2, 0]
    frac = allocate_heads(logits, 0.5, 0.05)[0]
    assert float(frac[0, 0]) > float(frac[1, 0]) > float(frac[0, 1]) > float(frac[1, 1]) >= 0.05


def test_head_allocation_refuses_bad_input():
    with pytest.raises(NammError, match="layers x heads"):
        HeadAllocation(((1.0, 2.0), (3.0,)))
    with pytest.raises(NammError, match="floor"):
        HeadAllocation(((1.0,),), floor=1.0)
    with pytest.raises(NammError, match="mean budget"):
        allocate_heads(torch.zeros(2, 2), 0.0)


def test_top_k_keep_takes_a_count_per_head():
    scores = torch.arange(24, dtype=torch.float32).view(1, 3, 8)
    valid = torch.ones(1, 3, 8, dtype=torch.bool)
    keep = top_k_keep(scores, valid, torch.tensor([[1, 4, 8]]))
    assert keep.sum(-1).tolist() == [[1, 4, 8]]
    assert keep[0, 1].tolist() == [False] * 4 + [True] * 4  # the top scores
    # AdaKV-style sharing keeps the layer's total of the per-head counts
    assert int(head_adaptive_keep(scores, valid, torch.tensor([[1, 4, 8]])).sum()) == 13


def _allocation(model) -> HeadAllocation:
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    logits = torch.linspace(-3, 3, layers * heads).view(layers, heads)
    return HeadAllocation(tuple(map(tuple, logits.tolist())), floor=0.1)


def test_streaming_with_a_head_allocation_keeps_each_heads_own_budget(tokenizer):
    model = tiny_model("llama")
    alloc = _allocation(model)
    policy = StreamingLLM(budget=0.4, allocation=alloc)
    out = namm.generate(model, tokenizer, random_prompt(96, seed=4), policy, max_new_tokens=2, delay=32,
                        chunk_size=32)
    frac = alloc.fractions(0.4)
    assert out.stats.steps
    differ = 0
    for s in out.stats.steps:
        expected = torch.ceil(s["n_seen"] * frac[s["layer"]] - 1e-9).long().tolist()
        assert all(row == expected for row in s["kept"]), (s, expected)
        differ += len(set(expected)) > 1
    assert differ >= 3  # the heads of a layer keep different numbers of tokens
    assert "heads[" in policy.describe()


def test_budgeted_namm_with_a_head_allocation_round_trips(tmp_path, tokenizer):
    model = tiny_model("llama")
    cfg = NAMMConfig(hop=4, n_fft=8, delay=16, budget=0.5, spectral_norm="per_head", key_norm_feature=True)
    params = torch.randn(param_count(cfg), generator=torch.Generator().manual_seed(5))
    policy = NAMM(cfg, params=params, head_allocation=_allocation(model))
    policy.save_pretrained(tmp_path)
    loaded = NAMM.from_pretrained(tmp_path)
    assert loaded.head_allocation == policy.head_allocation
    assert loaded.fingerprint() == policy.fingerprint()
    assert NAMM.from_pretrained(tmp_path, heads=False).head_allocation is None
    out = namm.generate(model, tokenizer, random_prompt(64, seed=2), loaded, max_new_tokens=1, delay=16,
                        chunk_size=16)
    frac = loaded.head_allocation.fractions(0.5)
    for s in out.stats.steps:
        expected = torch.ceil(s["n_seen"] * frac[s["layer"]] - 1e-9).long().tolist()
        assert all(row == expected for row in s["kept"])


def test_a_head_allocation_for_another_model_says_so(tokenizer):
    model = tiny_model("llama")
    alloc = HeadAllocation(((0.0, 1.0),) * 7)
    with pytest.raises(NammError, match="fit one for this model"):
        namm.generate(model, tokenizer, random_prompt(64, seed=2), StreamingLLM(budget=0.5, allocation=alloc),
                      max_new_tokens=1, delay=16, chunk_size=16)
