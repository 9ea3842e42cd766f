"""A memory step right after a prefill chunk reads the chunk's own attention weights instead of recomputing them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import namm
import namm.attention
import namm.step
from conftest import random_prompt, tiny_model, with_cache
from namm.cache import MemoryCache
from namm.memory import NAMM, NAMMConfig, param_count
from namm.policies import H2O, Full, SnapKV
from namm.policies.base import ALL_QUERIES, StepRequest, read_attention
from namm.policies.selection import top_k_keep


@pytest.fixture(autouse=True)
def reuse_on(monkeypatch):
    """The reuse is off by default (docs/benchmarks.md); these tests switch it on unless they say otherwise."""
    monkeypatch.setattr(MemoryCache, "reuse_attention", True)


@dataclass
class SpyH2O(H2O):
    """H2O that records, per (layer, n_seen), the whole ``(B, H, Q, T)`` attention its step carries (read in
    uneven blocks, so stream slicing is exercised)."""

    name = "spy-h2o"
    seen: dict = field(default_factory=dict)

    def score(self, step):
        q = step.query_positions.shape[0]
        b, h, t = step.valid.shape
        whole = torch.zeros(b, h, q, t)
        bounds = sorted({0, q // 3, q})
        for lo, att in zip(bounds, read_attention(step, bounds), strict=False):
            whole[:, :, lo : lo + att.shape[2], : att.shape[3]] = att
        self.seen[(step.layer_idx, step.n_seen)] = whole
        return super().score(step)


@dataclass
class WholeSpyH2O(SpyH2O):
    """The same, fed the whole matrix (``MemoryStep.attention``) instead of a stream."""

    request = StepRequest(queries=ALL_QUERIES, stream=False)


@dataclass
class UnevenSpyH2O(SpyH2O):
    """The spy keeping 12 tokens in KV head 0 and 4 in head 1: the layers store their heads apart (ragged)."""

    name = "uneven-spy-h2o"

    def keep(self, step, scores):
        k = torch.tensor([12, 4]).expand(step.valid.shape[0], 2)
        return top_k_keep(scores, step.valid, k)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of ``recompute_attention`` (the step's recompute) and ``explicit_attention`` (the reuse)."""
    calls = {"recompute": 0, "explicit": 0}
    recompute, explicit = namm.step.recompute_attention, namm.attention.explicit_attention

    def counting_recompute(*args, **kwargs):
        calls["recompute"] += 1
        return recompute(*args, **kwargs)

    def counting_explicit(*args, **kwargs):
        calls["explicit"] += 1
        return explicit(*args, **kwargs)

    monkeypatch.setattr(namm.step, "recompute_attention", counting_recompute)
    monkeypatch.setattr(namm.attention, "explicit_attention", counting_explicit)
    return calls


def _both_ways(monkeypatch, run):
    """``run()`` with the reuse on, then with every step recomputing."""
    reused = run()
    monkeypatch.setattr(MemoryCache, "reuse_attention", False)
    recomputed = run()
    monkeypatch.setattr(MemoryCache, "reuse_attention", True)
    return reused, recomputed


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # GQA: 4 query heads on 2 KV heads
@pytest.mark.parametrize(
    ("spy", "budget"), [(SpyH2O, 12), (WholeSpyH2O, 12), (SpyH2O, 1.0)], ids=["stream", "whole", "keep-all"]
)
@pytest.mark.parametrize("batch", [False, True], ids=["single", "left-padded"])
def test_reused_weights_equal_the_recomputed_ones(kind, spy, budget, batch, tokenizer, monkeypatch, counted):
    """Evicting (budget 12: every step after the first sees a compacted, per-head masked layer) or keeping all
    (the layer stays dense: transformers' own mask applies), one prompt or two of different lengths."""
    model = tiny_model(kind)
    prompts = [random_prompt(64, seed=1), random_prompt(41, seed=2)] if batch else random_prompt(64, seed=1)
    runs = []

    def run():
        policy = spy(budget=budget)
        out = namm.generate(model, tokenizer, prompts, policy, max_new_tokens=17, delay=16, return_logits=True)
        runs.append(policy.seen)
        return out

    reused, recomputed = _both_ways(monkeypatch, run)
    assert counted["explicit"] == 4 * 3  # the prefill steps at 16, 32, 48, 64 in each of the 3 layers
    seen, ref = runs
    assert seen.keys() == ref.keys() and {n for _, n in seen} == {16, 32, 48, 64, 80}  # 80: a decoding step
    for key in ref:
        torch.testing.assert_close(seen[key], ref[key], rtol=0, atol=1e-5)
    assert reused.token_ids == recomputed.token_ids
    torch.testing.assert_close(reused.logits, recomputed.logits, rtol=0, atol=1e-5)
    assert [s["kept"] for s in reused.stats.steps] == [s["kept"] for s in recomputed.stats.steps]


@pytest.mark.parametrize("batch", [False, True], ids=["single", "left-padded"])
def test_reused_weights_equal_the_recomputed_ones_when_heads_are_stored_apart(batch, tokenizer, monkeypatch, counted):
    """The attention of a ragged layer runs head by head; its weights, stacked as the step sees them, are the
    recomputed ones, and so are the outputs."""
    model = tiny_model("llama")
    prompts = [random_prompt(64, seed=1), random_prompt(41, seed=2)] if batch else random_prompt(64, seed=1)
    runs = []

    def run():
        policy = UnevenSpyH2O(budget=12)
        out = namm.generate(model, tokenizer, prompts, policy, max_new_tokens=17, delay=16, return_logits=True)
        runs.append(policy.seen)
        return out

    reused, recomputed = _both_ways(monkeypatch, run)
    # the first step (16) runs on whole layers, once per layer; the steps at 32, 48, 64 once per KV head
    assert counted["explicit"] == 3 + 3 * 3 * 2
    seen, ref = runs
    assert seen.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(seen[key], ref[key], rtol=0, atol=1e-5)
    assert reused.token_ids == recomputed.token_ids
    torch.testing.assert_close(reused.logits, recomputed.logits, rtol=0, atol=1e-5)
    assert all(s["kept"][0] == [12, 4] for s in reused.stats.steps if s["n_seen"] >= 32)
    assert reused.stats.padding_fraction == 0 or batch  # one row: nothing padded at all


@pytest.mark.parametrize("kind", ["llama", "gemma3"])  # Gemma 3: sliding layers stay on SDPA, 4 query heads per KV
def test_namm_logits_under_reuse_match_the_recompute_path(kind, tokenizer, monkeypatch, counted):
    model = tiny_model(kind)
    prompts = [random_prompt(100, seed=8), random_prompt(70, seed=9)]
    params = torch.randn(param_count(), generator=torch.Generator().manual_seed(3)) * 0.2

    def run():
        policy = NAMM(NAMMConfig(selection="per_head"), params=params)
        policy.normaliser.load(torch.full((17,), 0.01), torch.full((17,), 0.01), 1.0, True)  # unit-scale spectra
        return namm.generate(model, tokenizer, prompts, policy, max_new_tokens=10, delay=32, return_logits=True)

    reused, recomputed = _both_ways(monkeypatch, run)
    managed = len(MemoryCache(model, Full()).managed_ids)
    assert counted["explicit"] == 3 * managed  # the steps at 32, 64 and 96
    assert reused.token_ids == recomputed.token_ids
    torch.testing.assert_close(reused.logits, recomputed.logits, rtol=0, atol=1e-5)
    kept = [s["kept"] for s in reused.stats.steps]
    assert kept == [s["kept"] for s in recomputed.stats.steps]
    assert any(min(min(r) for r in k) < max(max(r) for r in k) for k in kept)  # it did evict


def test_the_reuse_runs_where_a_chunk_ends_on_a_step_and_only_there(llama, tokenizer, counted):
    prompt = random_prompt(64, seed=4)
    namm.generate(llama, tokenizer, prompt, H2O(budget=12), max_new_tokens=0, delay=16)  # chunk = delay
    assert counted == {"recompute": 0, "explicit": 12}  # 4 steps x 3 layers, none recomputed
    counted.update(recompute=0, explicit=0)
    namm.generate(llama, tokenizer, prompt, H2O(budget=12), max_new_tokens=0, delay=16, chunk_size=8)
    assert counted == {"recompute": 12, "explicit": 0}  # two chunks per step: the step recomputes
    counted.update(recompute=0)
    namm.generate(llama, tokenizer, prompt, H2O(budget=12), max_new_tokens=17, delay=16)
    assert counted == {"recompute": 3, "explicit": 12}  # the decoding step at 80 recomputes
    counted.update(recompute=0, explicit=0)
    for policy in (Full(), SnapKV(budget=12, window=16)):  # no attention, or not every query's
        namm.generate(llama, tokenizer, prompt, policy, max_new_tokens=0, delay=16)
    assert counted["explicit"] == 0


def test_a_whole_prompt_inside_model_generate_is_one_reused_step(llama, tokenizer, counted):
    ids = tokenizer(random_prompt(40, seed=6), return_tensors="pt").input_ids
    cache = MemoryCache(llama, H2O(budget=12), delay=32)
    llama.generate(ids, max_new_tokens=4, do_sample=False, **with_cache(llama, cache))
    assert [s.n_seen for s in cache.stats.steps] == [40] * 3  # one step over the prompt's 40 queries
    assert counted == {"recompute": 0, "explicit": 3}


def test_the_reuse_falls_back_when_the_weights_would_not_fit(llama, tokenizer, counted, monkeypatch):
    monkeypatch.setattr(namm.cache, "ATTENTION_CHUNK_ELEMENTS", 2 * 16 * 16)  # (B, H, Q, T) of the step at 16 only
    namm.generate(llama, tokenizer, random_prompt(32, seed=4), H2O(budget=12), max_new_tokens=0, delay=16)
    assert counted == {"recompute": 3, "explicit": 3}


def test_explicit_attention_in_query_blocks_equals_per_head_sdpa(monkeypatch):
    """Several blocks of queries, a per-KV-head mask, GQA: the output is SDPA's, the weights the softmax's."""
    g = torch.Generator().manual_seed(0)
    b, hq, h, q, t, d = 2, 4, 2, 7, 10, 8
    query, key, value = (torch.randn(*shape, generator=g) for shape in ((b, hq, q, d), (b, h, t, d), (b, h, t, d)))
    allowed = torch.rand(b, h, q, t, generator=g) > 0.3
    allowed[..., t - q :] &= torch.ones(q, q, dtype=torch.bool).tril()
    allowed[..., t - q :] |= torch.eye(q, dtype=torch.bool)  # every query sees itself
    monkeypatch.setattr(namm.attention, "LOGIT_BLOCK_ELEMENTS", b * hq * t * 3)  # 3 queries per block
    out, weights = namm.attention.explicit_attention(query, key, value, allowed, 0.3, None)
    torch.testing.assert_close(out, namm.attention._per_head_sdpa(query, key, value, allowed, 0.3))
    logits = (query.view(b, h, 2, q, d) * 0.3) @ key[:, :, None].transpose(-1, -2)
    ref = torch.softmax(logits.masked_fill(~allowed[:, :, None], float("-inf")), dim=-1).mean(dim=2)
    torch.testing.assert_close(weights, ref)
    real = torch.tensor([[True] * q, [False] * 2 + [True] * (q - 2)])
    _, masked = namm.attention.explicit_attention(query, key, value, allowed, 0.3, real)
    assert masked[1, :, :2].abs().sum() == 0 and torch.equal(masked[0], weights[0])
