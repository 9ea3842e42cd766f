"""The memory runtime: equivalence with plain transformers, eviction as masking, padding, model.generate."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import namm
import namm.store
from conftest import random_prompt, tiny_model, with_cache
from namm.policies import H2O, AdaKV, Full, Policy, SnapKV
from namm.policies.base import ALL_QUERIES, StepRequest


def test_full_policy_reproduces_model_generate(any_model, tokenizer):
    prompt = random_prompt(90)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    ref = any_model.generate(
        ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    out = namm.generate(any_model, tokenizer, prompt, Full(), max_new_tokens=12, delay=32, return_logits=True)
    new = ref.sequences[0, ids.shape[1] :].tolist()
    assert out.token_ids == new[: len(out.token_ids)]
    assert len(out.token_ids) == len(new)
    ref_logits = torch.stack(ref.logits, dim=1)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_cache_works_inside_model_generate(llama, tokenizer):
    ids = tokenizer(random_prompt(70, seed=3), return_tensors="pt").input_ids
    ref = llama.generate(ids, max_new_tokens=10, do_sample=False)
    cache = namm.MemoryCache(llama, Full(), delay=16)
    out = llama.generate(ids, max_new_tokens=10, do_sample=False, **with_cache(llama, cache))
    assert torch.equal(ref, out)
    evicting = namm.MemoryCache(llama, H2O(budget=24), delay=16)
    llama.generate(ids, max_new_tokens=20, do_sample=False, **with_cache(llama, evicting))
    kept = evicting.kept_tokens()
    assert evicting.get_seq_length() == ids.shape[1] + 19
    assert int(kept.max()) < ids.shape[1]  # something was evicted at the decoding-time memory steps


@dataclass
class EvictGiven(Policy):
    """Test policy: at the memory step at ``when`` tokens, evict the given positions from given heads."""

    name = "evict-given"
    hide: dict = None  # (layer, head) -> list of absolute positions
    when: int = 0

    def keep(self, step, scores):
        keep = step.valid.clone()
        if step.n_seen != self.when:
            return keep
        for (layer, head), positions in self.hide.items():
            if layer == step.layer_idx:
                gone = torch.isin(step.positions[:, head], torch.tensor(positions))
                keep[:, head] &= ~gone
        return keep


HIDDEN: dict = {}


def head_masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager reference: causal attention where HIDDEN[(layer, kv_head)] = (from_pos, positions) hides keys."""
    b, hq, q, d = query.shape
    h, t = key.shape[1], key.shape[2]
    g = hq // h
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    qpos = torch.arange(t - q, t)
    allowed = (torch.arange(t)[None, :] <= qpos[:, None]).expand(b, hq, q, t).clone()
    for (layer, head), (from_pos, positions) in HIDDEN.items():
        if layer != module.layer_idx:
            continue
        for qh in range(head * g, head * g + g):
            for j in positions:
                allowed[:, qh, qpos >= from_pos, j] = False
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("head_masked", head_masked_attention)
AttentionMaskInterface.register("head_masked", sdpa_mask)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("ragged", [True, False], ids=["heads-apart", "padded"])
def test_eviction_equals_masking_that_head(kind, ragged, tokenizer, monkeypatch):
    """Heads evicting different numbers of tokens: stored apart (the default here) or padded to the longest."""
    if not ragged:
        monkeypatch.setattr(namm.store, "RAGGED_MIN_SAVING", 1.0)
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(1)
    hide = {
        (0, 1): torch.randperm(60, generator=g)[:20].tolist(),
        (1, 0): torch.randperm(60, generator=g)[:35].tolist(),
        (2, 1): list(range(5, 50)),
    }
    prompt = random_prompt(64, seed=7)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] == 64
    extra = tokenizer(random_prompt(9, seed=8), return_tensors="pt").input_ids
    cache = namm.MemoryCache(model, EvictGiven(hide=hide, when=64), delay=32)
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        assert not cache.layers[0].dense
        assert [cache.layers[i].ragged for i in range(3)] == [ragged] * 3
        kept = cache.kept_tokens()
        assert kept[0, 0, 1] == 64 - 20 and kept[1, 0, 0] == 64 - 35 and kept[2, 0, 1] == 64 - 45
        got = torch.cat([model(extra[:, i : i + 1], **with_cache(model, cache)).logits for i in range(4)], dim=1)
        got = torch.cat([got, model(extra[:, 4:], **with_cache(model, cache)).logits], dim=1)
        HIDDEN.clear()
        HIDDEN.update({key: (64, pos) for key, pos in hide.items()})
        model.set_attn_implementation("head_masked")
        try:
            ref = model(torch.cat([ids, extra], dim=1)).logits[:, 64:]
        finally:
            model.set_attn_implementation("namm")
            HIDDEN.clear()
        plain = model(torch.cat([ids, extra], dim=1)).logits[:, 64:]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the eviction did change the outputs


def test_a_layer_with_uneven_heads_stores_what_it_keeps(llama, tokenizer, monkeypatch):
    """Heads apart, the bytes stored are the tokens kept, exactly; padded to the longest head, more."""
    hide = {(0, 1): list(range(10, 50)), (1, 0): list(range(4, 60)), (2, 1): list(range(20, 40))}
    ids = tokenizer(random_prompt(64, seed=7), return_tensors="pt").input_ids
    stored = {}
    for ragged in (True, False):
        if not ragged:
            monkeypatch.setattr(namm.store, "RAGGED_MIN_SAVING", 1.0)
        cache = namm.MemoryCache(llama, EvictGiven(hide=hide, when=64), delay=32)
        with torch.no_grad():
            llama(ids, **with_cache(llama, cache))
        layer = cache.layers[0]
        per_token = 2 * layer.keys.shape[-1] * layer.keys.element_size()  # a key and a value, one head
        kept = int(cache.kept_tokens().sum())
        assert kept == 3 * 2 * 64 - 40 - 56 - 20
        stored[ragged] = cache.kv_bytes()
        assert (stored[ragged] == kept * per_token) == ragged
        assert (cache.padding_fraction() == 0) == ragged
    assert stored[True] < stored[False] == 3 * 2 * 64 * per_token  # padded: every layer's longest head holds 64


def test_model_generate_runs_on_a_cache_whose_heads_are_stored_apart(llama, tokenizer, monkeypatch):
    """AdaKV shares each layer's budget between its heads, so its layers store their heads apart; inside
    transformers' own generate loop the tokens are those of the same cache padded to the longest head."""
    ids = tokenizer(random_prompt(80, seed=5), return_tensors="pt").input_ids
    runs = {}
    for ragged in (True, False):
        if not ragged:
            monkeypatch.setattr(namm.store, "RAGGED_MIN_SAVING", 1.0)
        cache = namm.MemoryCache(llama, AdaKV(budget=24, window=8), delay=16)
        runs[ragged] = llama.generate(ids, max_new_tokens=20, do_sample=False, **with_cache(llama, cache))
        assert any(layer.ragged for layer in cache.managed) == ragged
        kept = cache.kept_tokens()
        since_step = ids.shape[1] + 19 - 96  # tokens appended after the last memory step (at 96)
        assert bool((kept.sum(dim=-1) == 2 * (24 + since_step)).all()) and bool((kept[..., 0] != kept[..., 1]).any())
    assert torch.equal(runs[True], runs[False])


def test_positions_survive_eviction(llama, tokenizer):
    prompt = random_prompt(96, seed=2)
    cache = namm.MemoryCache(llama, SnapKV(budget=20, window=8), delay=32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for start in range(0, 96, 32):
            llama(ids[:, start : start + 32], **with_cache(llama, cache))
    for layer in cache.managed:
        pos = layer.positions.masked_fill(~layer.valid, -1)
        # kept positions are increasing within each head, the newest window survived, nothing moved
        valid_pos = [p[p >= 0] for p in pos.view(-1, pos.shape[-1])]
        for p in valid_pos:
            assert torch.all(p[1:] > p[:-1])
            assert set(range(88, 96)) <= set(p.tolist())
        assert layer.n_seen == 96 and cache.get_seq_length() == 96


def test_left_padded_batch_matches_single_prompts(tokenizer):
    model = tiny_model("llama")
    prompts = [random_prompt(70, seed=11), random_prompt(45, seed=12)]
    batch = namm.generate(model, tokenizer, prompts, Full(), max_new_tokens=8, delay=32)
    for i, p in enumerate(prompts):
        single = namm.generate(model, tokenizer, p, Full(), max_new_tokens=8, delay=32)
        assert batch.token_ids[i] == single.token_ids
    evicting = namm.generate(model, tokenizer, prompts, H2O(budget=16), max_new_tokens=8, delay=32)
    assert evicting.stats.prompt_tokens == [70, 45]
    # the unpadded row evicts and generates exactly as it does alone
    alone = namm.generate(model, tokenizer, prompts[0], H2O(budget=16), max_new_tokens=8, delay=32)
    assert evicting.token_ids[0] == alone.token_ids
    assert [(s["layer"], s["n_seen"], s["kept"][0]) for s in evicting.stats.steps] == [
        (s["layer"], s["n_seen"], s["kept"][0]) for s in alone.stats.steps]
    # padding never counts as a kept token: the padded row (25 pads) keeps min(budget, its real tokens) per head
    steps = evicting.stats.steps
    assert sorted({s["n_seen"] for s in steps}) == [32, 64, 70] and len(steps) == 9
    for s in steps:
        assert s["kept"][1] == [min(16, s["n_seen"] - 25)] * 2, s  # 7 real tokens at the step at 32


def test_chunked_prefill_memory_steps_land_on_multiples(llama, tokenizer):
    out = namm.generate(llama, tokenizer, random_prompt(100), H2O(budget=10), max_new_tokens=30, delay=32, chunk_size=8)
    seen = sorted({s["n_seen"] for s in out.stats.steps})
    assert seen == [32, 64, 96, 100, 128]  # the cadence's multiples, plus the budget step at the prompt's end


@pytest.mark.parametrize("policy", [H2O(budget=16), SnapKV(budget=0.25, window=8)], ids=["h2o", "snapkv"])
def test_a_budget_holds_before_decoding_on_a_prompt_shorter_than_the_cadence(policy, llama, tokenizer):
    prompt = random_prompt(40, seed=9)
    budget = 16 if isinstance(policy.budget, int) else 10
    out = namm.generate(llama, tokenizer, prompt, policy, max_new_tokens=1, delay=512)
    assert [(s["layer"], s["n_seen"]) for s in out.stats.steps] == [(i, 40) for i in range(3)]  # recorded steps
    assert all(v == budget for s in out.stats.steps for row in s["kept"] for v in row)
    assert max(v for row in out.stats.kept_tokens for v in row) <= budget  # what the answer was generated from
    # the same inside model.generate: the step runs at the first decoding call, before its attention
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = namm.MemoryCache(llama, policy, delay=512)
    seen = []
    llama.generate(ids, max_new_tokens=3, do_sample=False, **with_cache(llama, cache),
                   logits_processor=[lambda _ids, scores: seen.append(int(cache.kept_tokens().max())) or scores])
    assert [s.n_seen for s in cache.stats.steps] == [40] * 3
    assert seen[1:] == [budget + 1, budget + 2]  # after the prompt, the cache grows from the budget
    # a policy without a budget takes no extra step, and Full still reproduces the model
    full = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=1, delay=512)
    assert full.stats.steps == [] and full.stats.kept_tokens[0][0] == 40


def test_recomputed_attention_equals_eager_weights(tokenizer):
    """What a policy sees at a memory step is the model's own attention (GQA-averaged) for those queries."""
    model = tiny_model("qwen2")
    ids = tokenizer(random_prompt(48, seed=5), return_tensors="pt").input_ids
    seen = {}

    @dataclass
    class Spy(Policy):
        name = "spy"
        request = StepRequest(queries=ALL_QUERIES)

        def score(self, step):
            seen[(step.layer_idx, step.n_seen)] = step.attention.clone()
            return super().score(step)

    cache = namm.MemoryCache(model, Spy(), delay=16)
    with torch.no_grad():
        model(ids[:, :32], **with_cache(model, cache))
        model(ids[:, 32:], **with_cache(model, cache))  # the step at 48 sees queries 32..47
        model.set_attn_implementation("eager")
        try:
            eager = model(ids, output_attentions=True).attentions
        finally:
            model.set_attn_implementation("namm")
    layers = model.config.num_hidden_layers
    assert {layer for layer, n_seen in seen if n_seen == 48} == set(range(layers))  # the spy ran on every layer
    for layer in range(layers):
        attn = seen[(layer, 48)]
        ref = eager[layer][:, :, 32:48]  # (B, H_q, Q, T)
        ref = ref.view(1, 2, 2, 16, 48).mean(dim=2)
        torch.testing.assert_close(attn, ref, rtol=1e-5, atol=1e-6)


def test_question_agnostic_mode_compresses_before_the_question(llama, tokenizer):
    context, question = random_prompt(70, seed=21), " " + random_prompt(9, seed=22)
    out = namm.generate(llama, tokenizer, context, H2O(budget=20), max_new_tokens=3, delay=32, question=question)
    steps = sorted({s["n_seen"] for s in out.stats.steps})
    assert steps == [32, 64, 70]  # the forced step at the end of the context
    assert out.stats.prompt_tokens == [79]
    full = namm.generate(llama, tokenizer, context, Full(), max_new_tokens=3, delay=32, question=question)
    joint = namm.generate(llama, tokenizer, context + question, Full(), max_new_tokens=3, delay=32)
    assert full.token_ids == joint.token_ids


def test_a_cache_is_freed_as_soon_as_nothing_refers_to_it(llama, tokenizer):
    """No reference cycle keeps a cache (its keys and values) alive until the cyclic garbage collector runs: a
    population evaluation makes one per call, gigabytes each."""
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    ids = tokenizer(random_prompt(80, seed=2), return_tensors="pt")["input_ids"]
    gc.collect()
    gc.disable()
    try:
        cache = namm.MemoryCache(llama, SnapKV(budget=16), delay=32)
        llama(input_ids=ids, use_cache=True, **with_cache(llama, cache))
        assert cache.stats.steps  # memory steps ran through the attention callbacks
        ref = weakref.ref(cache)
        del cache
        assert ref() is None
        out = namm.generate(llama, tokenizer, random_prompt(80, seed=3), H2O(budget=16), max_new_tokens=2, delay=32)
        assert out.stats.steps
    finally:
        gc.enable()
