"""NAMM inside the runtime on a tiny random Llama: zero parameters reproduce the full cache."""

from __future__ import annotations

import math

import torch

import namm
from conftest import random_prompt, with_cache
from namm.memory import NAMM, NAMMConfig, param_count, unflatten
from namm.policies import Full
from namm.policies.base import ALL_QUERIES, StepRequest


def cosine_age_params() -> torch.Tensor:
    """Score = cos(age) - 0.5 (BAM attention and residual zero, head reads the cos(age * 1) feature)."""
    v = torch.zeros(param_count())
    w = unflatten(v)
    w["head_weight"][4, 0] = 1.0
    w["head_bias"][0] = -0.5
    return v


def reading_attention(params: torch.Tensor) -> torch.Tensor:
    """``params`` with a non-zero ``qkv`` weight on the first spectrogram bin and the output projection left at
    zero: the same scores, but the NAMM now reads the attention features, so every memory step computes them."""
    v = params.clone()
    unflatten(v)["qkv_weight"][8, 0] = 1.0
    return v


def test_zero_params_reproduce_full_cache(llama, tokenizer, monkeypatch):
    prompt = random_prompt(90, seed=5)
    ref = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=12, delay=32, return_logits=True)
    for policy in (NAMM(), NAMM(params=reading_attention(torch.zeros(param_count())))):
        out = namm.generate(llama, tokenizer, prompt, policy, max_new_tokens=12, delay=32, return_logits=True)
        assert out.token_ids == ref.token_ids
        assert len(out.stats.steps) > 0
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)  # recomputing at every step: bit for bit
    # With the attention reuse on, the chunks that end on a step compute their attention explicitly (float32
    # softmax, P @ V) to hand its weights to the step: the model's outputs up to rounding.
    monkeypatch.setattr(namm.MemoryCache, "reuse_attention", True)
    reading = NAMM(params=reading_attention(torch.zeros(param_count())))
    assert reading.request.queries == ALL_QUERIES
    out = namm.generate(llama, tokenizer, prompt, reading, max_new_tokens=12, delay=32, return_logits=True)
    assert out.token_ids == ref.token_ids
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_a_scorer_that_reads_no_attention_feature_skips_the_attention_and_scores_alike(llama, tokenizer):
    """The recency-only scorer asks for no attention weights and keeps no spectrogram state; the same scorer made
    to read the attention features (a zero-effect ``qkv`` weight) computes them and evicts exactly alike."""
    skipping = NAMM(NAMMConfig(selection="per_head"), params=cosine_age_params())
    computing = NAMM(NAMMConfig(selection="per_head"), params=reading_attention(cosine_age_params()))
    assert skipping.request.queries is None and not skipping.request.stream
    assert computing.request.queries == ALL_QUERIES and computing.request.stream
    prompt = random_prompt(100, seed=9)
    runs = [namm.generate(llama, tokenizer, prompt, p, max_new_tokens=16, delay=32, return_logits=True)
            for p in (skipping, computing)]
    assert runs[0].token_ids == runs[1].token_ids
    torch.testing.assert_close(runs[0].logits, runs[1].logits, rtol=0, atol=0)
    kept = [[s["kept"] for s in r.stats.steps] for r in runs]
    assert kept[0] == kept[1] and len(kept[0]) >= 3
    assert runs[0].stats.peak_kv_tokens > max(n for s in kept[0] for row in s for n in row)  # it evicted


def test_scores_evict_and_state_follows_the_cache(llama, tokenizer):
    policy = NAMM(NAMMConfig(selection="per_head"), params=reading_attention(cosine_age_params()))
    cache = namm.MemoryCache(llama, policy, delay=32)
    ids = tokenizer(random_prompt(40, seed=6), return_tensors="pt").input_ids
    llama.generate(ids, max_new_tokens=30, do_sample=False, **with_cache(llama, cache))  # steps at 40 (Q=40), 64
    layer = cache.managed[0]
    expected = 1 + sum(math.cos(a) >= 0.5 for a in range(1, 40))  # first step: newest + cos(age) >= 0.5
    first = cache.stats.steps[0]
    assert first.n_seen == 40 and (first.kept == expected).all()
    assert layer.state["namm_ema"].shape == (*layer.positions.shape, 17)
    assert layer.state["namm_carry"].shape == (*layer.positions.shape, 16)
    assert torch.isfinite(layer.state["namm_ema"]).all()
    assert int(cache.kept_tokens().max()) < cache.get_seq_length()


def test_population_rows_match_single_runs(llama, tokenizer):
    prompt = random_prompt(70, seed=7)
    vectors = torch.stack([torch.zeros(param_count()), cosine_age_params()])
    pop = NAMM()
    pop.set_population(vectors)
    batch = namm.generate(llama, tokenizer, [prompt, prompt], pop, max_new_tokens=8, delay=32)
    for r in range(2):
        single = namm.generate(llama, tokenizer, prompt, NAMM(params=vectors[r]), max_new_tokens=8, delay=32)
        assert batch.token_ids[r] == single.token_ids
        assert [s["kept"][r] for s in batch.stats.steps] == [s["kept"][0] for s in single.stats.steps]


class WholeMatrixNAMM(NAMM):
    """NAMM fed the whole recomputed (B, H, Q, T) attention instead of streamed query blocks."""

    request = StepRequest(queries=ALL_QUERIES, stream=False)


def test_streamed_attention_equals_the_whole_matrix(llama, tokenizer):
    """Blocks of the recomputed attention (masked by validity, causality and left padding) fold into the
    same features as the whole matrix: same evictions, same tokens. 96 queries per step: two blocks."""
    prompts = [random_prompt(300, seed=8), random_prompt(230, seed=9)]  # left padding in the second row
    params = torch.randn(param_count(), generator=torch.Generator().manual_seed(3)) * 0.2
    runs = []
    for cls in (NAMM, WholeMatrixNAMM):
        policy = cls(NAMMConfig(selection="per_head"), params=params)
        policy.normaliser.load(torch.full((17,), 0.01), torch.full((17,), 0.01), 1.0, True)  # unit-scale spectra
        runs.append(namm.generate(llama, tokenizer, prompts, policy, max_new_tokens=10, delay=96, chunk_size=32))
    streamed, whole = runs
    assert streamed.token_ids == whole.token_ids
    assert [s["kept"] for s in streamed.stats.steps] == [s["kept"] for s in whole.stats.steps]
    assert any(min(min(r) for r in s["kept"]) < max(max(r) for r in s["kept"]) for s in streamed.stats.steps)
