"""The peer policies (TOVA, AdaKV, PyramidKV, KVzip), the cache probe they rely on, and answer scoring."""

from __future__ import annotations

import pytest
import torch

import namm
from conftest import random_prompt, tiny_model, with_cache
from namm.engine import probe_step
from namm.errors import NammError
from namm.policies import TOVA, AdaKV, Full, KVzip, MemoryStep, PyramidKV, SnapKV, make_policy
from namm.policies.base import Probe, probe_max_attention
from namm.policies.selection import head_adaptive_keep, top_k_keep
from test_runtime import HIDDEN


def _step(b=1, h=3, t=40, q=4, seed=0, layer_idx=0, num_layers=1) -> MemoryStep:
    g = torch.Generator().manual_seed(seed)
    att = torch.softmax(torch.randn(b, h, q, t, generator=g) * 3, dim=-1)
    return MemoryStep(
        layer_idx=layer_idx, num_layers=num_layers, keys=torch.randn(b, h, t, 4, generator=g),
        values=torch.zeros(b, h, t, 4), positions=torch.arange(t).expand(b, h, t).clone(),
        valid=torch.ones(b, h, t, dtype=torch.bool), attention=att, query_positions=torch.arange(t - q, t),
        n_seen=t, n_real=torch.full((b,), t),
    )


def test_tova_keeps_the_top_head_mean_attention_of_the_newest_query():
    step = _step(b=2, h=3, t=40, q=1)
    policy = TOVA(budget=10)
    keep = policy.keep(step, policy.score(step))
    rule = step.attention[:, :, -1].mean(dim=1)  # (B, T): the newest query, mean over the layer's heads
    for b in range(2):
        expect = set(rule[b, :-1].topk(9).indices.tolist()) | {39}  # the newest token is always kept
        for h in range(3):
            assert set(torch.nonzero(keep[b, h]).flatten().tolist()) == expect


@pytest.mark.parametrize("safeguard", [0.0, 0.2, 0.5])
def test_adakv_keeps_the_layers_top_snapkv_scores_over_all_heads(safeguard):
    step = _step(b=2, h=3, t=60, q=8, seed=3)
    step.attention[:, 0] = step.attention[:, 0] ** 4  # a peaked head next to flat ones
    step.attention /= step.attention.sum(-1, keepdim=True)
    policy = AdaKV(budget=16, window=8, safeguard=safeguard)
    scores = policy.score(step)
    torch.testing.assert_close(scores, SnapKV(budget=16, window=8).score(step))  # AdaKV scores are SnapKV's
    keep = policy.keep(step, scores)
    counts = keep.sum(dim=-1)
    assert counts.sum(dim=-1).tolist() == [16 * 3, 16 * 3]  # the layer's total is its budget
    assert (counts != 16).any(), "heads should share the budget unevenly"
    safe = int(16 * safeguard)
    assert int(counts.min()) >= max(safe, 8)  # every head keeps its safeguard share (and its window)
    for b in range(2):
        guaranteed = top_k_keep(scores[b : b + 1], step.valid[b : b + 1], torch.tensor([safe]))[0]
        rest = keep[b] & ~guaranteed
        if rest.any() and (~keep[b]).any():
            assert scores[b][rest].min() >= scores[b][~keep[b]].max()  # beyond the safeguard: the top scores


def test_shared_budgets_ask_for_an_extra_step_only_when_the_layer_total_is_over():
    """AdaKV and layer-wise KVzip share a layer's budget between its heads: a head above its even share is no
    reason for a step at the end of the prompt, the layer's total above ``budget x H`` is; per-head policies
    still check every head."""
    step = _step(b=1, h=3, t=20, q=4)
    step.valid[:, 1:, 12:] = False  # heads hold 20, 12, 12: 44 in all
    for budget, shared_over in ((15, False), (14, True)):  # totals 45 and 42
        assert AdaKV(budget=budget).over_budget(step) is shared_over
        assert KVzip(budget=budget).over_budget(step) is shared_over
        assert KVzip(budget=budget, per_head=True).over_budget(step) is True  # head 0 holds 20 > budget
        assert SnapKV(budget=budget).over_budget(step) is True


def test_head_adaptive_keep_never_exceeds_valid_slots():
    scores = torch.tensor([[[5.0, 4.0, 3.0, 2.0], [1.0, 0.5, 0.2, 0.1]]])
    valid = torch.tensor([[[True, True, False, False], [True, True, True, True]]])
    keep = head_adaptive_keep(scores, valid, torch.tensor([3]))
    assert keep.tolist() == [[[True, True, False, False], [True, True, True, True]]]
    assert int(keep.sum()) == 6


def test_pyramidkv_budgets_fall_with_depth_and_average_to_the_budget():
    policy = PyramidKV(budget=200, window=8, beta=20)
    budgets = [int(policy.budget_tokens(_step(t=1000, layer_idx=i, num_layers=30))[0]) for i in range(30)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 200 > budgets[-1]
    assert budgets[-1] == 10 and abs(sum(budgets) / 30 - 200) < 1
    capped = [int(PyramidKV(budget=0.75, window=8).budget_tokens(_step(t=100, layer_idx=i, num_layers=4))[0])
              for i in range(4)]
    assert capped[0] == 100 and abs(sum(capped) / 4 - 75) <= 1  # the first layer cannot keep more than it saw


def test_peers_are_registered():
    assert isinstance(make_policy("KVzip", budget=0.5), KVzip) and KVzip.request.probe
    assert {"tova", "adakv", "pyramidkv", "kvzip"} <= set(namm.policies.POLICIES)


def test_probe_max_attention_normalises_over_the_given_slots():
    g = torch.Generator().manual_seed(0)
    b, h, gq, t, p, d = 1, 2, 2, 10, 3, 4
    step = _step(b=b, h=h, t=t)
    step.keys = torch.randn(b, h, t, d, generator=g)
    step.probe = Probe(queries=torch.randn(b, h * gq, p, d, generator=g), keys=torch.randn(b, h, p, d, generator=g),
                       start=6, scaling=0.5)
    over = torch.zeros(b, h, t, dtype=torch.bool)
    over[..., [0, 1, 6, 7, 8, 9]] = True
    got = probe_max_attention(step, over, block=2)
    q = step.probe.queries.view(b, h, gq, p, d)
    keys = torch.cat([step.keys[:, :, over[0, 0]], step.probe.keys], dim=2)  # the kept slots, then the probe
    logits = q @ keys[:, :, None].transpose(-1, -2) * 0.5
    n = int(over[0, 0].sum())
    logits[..., n:] = logits[..., n:].masked_fill(~torch.ones(p, p, dtype=torch.bool).tril(), float("-inf"))
    expect = torch.softmax(logits, dim=-1)[..., :n].amax(dim=(2, 3))
    torch.testing.assert_close(got[:, :, over[0, 0]], expect)
    assert (got[:, :, ~over[0, 0]] == 0).all()


def _eager_attentions(model, ids):
    model.set_attn_implementation("eager")
    try:
        return model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("namm")


@torch.no_grad()
def test_kvzip_scores_are_the_reconstructions_max_attention_and_its_tokens_leave_the_cache(tokenizer):
    model = tiny_model("llama")  # 4 query heads on 2 KV heads
    ctx = tokenizer(random_prompt(48, seed=31), return_tensors="pt").input_ids
    extra = tokenizer(random_prompt(9, seed=32), return_tensors="pt").input_ids
    policy = KVzip(budget=16)
    cache = namm.MemoryCache(model, policy, delay=1024)
    cache.hold_steps()
    model(ctx, **with_cache(model, cache))
    seconds = probe_step(model, tokenizer, cache, ctx, final=True)  # the question-agnostic compression point
    assert seconds > 0
    probe = policy.probe_ids(tokenizer, ctx, ctx[:, :0])
    n, p = ctx.shape[1], probe.shape[1]
    eager = _eager_attentions(model, torch.cat([ctx, probe], dim=1))
    hide = {}
    for layer in cache.managed:
        ref = eager[layer.layer_idx][:, :, n:, :n].reshape(1, 2, 2, p, n).amax(dim=(2, 3))  # (1, H, N)
        pos, valid = layer.positions, layer.valid
        got = layer.state["kvzip"]
        torch.testing.assert_close(got[valid], ref.gather(2, pos.clamp(max=n - 1))[valid], rtol=1e-5, atol=1e-6)
        # the step kept the top scores over both heads (sinks protected), and no reconstruction token
        assert layer.n_seen == n and int(pos[valid].max()) < n and layer.keys.shape[2] == int(valid.sum(-1).max())
        kept = layer.kept_counts()[0]
        assert int(kept.sum()) == 2 * 16 and set(range(4)) <= set(pos[0, 0][valid[0, 0]].tolist())
        lifted = ref.clone()
        lifted[..., :4] = 10.0
        top = set(lifted.flatten().topk(32).indices.tolist())
        assert {int(h) * n + int(q) for h in range(2) for q in pos[0, h][valid[0, h]]} == top
        for h in range(2):
            hide[(layer.layer_idx, h)] = (n, sorted(set(range(n)) - set(pos[0, h][valid[0, h]].tolist())))
    assert cache.get_seq_length() == n
    assert any(len(v[1]) != len(hide[(k[0], 0)][1]) for k, v in hide.items())  # heads hold different counts
    got = model(extra, **with_cache(model, cache)).logits
    HIDDEN.clear()
    HIDDEN.update(hide)
    model.set_attn_implementation("head_masked")
    try:
        ref = model(torch.cat([ctx, extra], dim=1)).logits[:, n:]
    finally:
        model.set_attn_implementation("namm")
        HIDDEN.clear()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_kvzip_runs_in_the_engine_on_the_cadence_and_refuses_a_bare_cache(llama, tokenizer):
    prompt = random_prompt(100, seed=5)
    out = namm.generate(llama, tokenizer, prompt, KVzip(budget=20), max_new_tokens=40, delay=32, ignore_eos=True)
    seen = sorted({s["n_seen"] for s in out.stats.steps})
    # 100: the end-of-prompt step (the budget holds before decoding); decoding steps probe the generated tokens
    assert seen == [32, 64, 96, 100, 128] and out.stats.probe_seconds > 0
    for s in out.stats.steps:
        assert sum(s["kept"][0]) == 2 * 20
    qa = namm.generate(llama, tokenizer, prompt, KVzip(budget=20), max_new_tokens=3, delay=1024, question=" w5 w6")
    assert sorted({s["n_seen"] for s in qa.stats.steps}) == [100]  # one compression, at the end of the context
    with pytest.raises(NammError, match="single prompt"):
        namm.generate(llama, tokenizer, [prompt, prompt], KVzip(budget=20), max_new_tokens=2, delay=32)
    cache = namm.MemoryCache(llama, KVzip(budget=8), delay=16)
    with pytest.raises(NammError, match="running the model"):
        llama(tokenizer(prompt, return_tensors="pt").input_ids[:, :32], **with_cache(llama, cache))
    namm.cache.clear_pending()


@pytest.mark.parametrize("question", [None, " w5 w6"], ids=["on-the-cadence", "question-agnostic"])
def test_each_layer_steps_as_soon_as_its_part_of_the_probe_has_run(question, llama, tokenizer, monkeypatch):
    """The same steps, cache and logits as stepping after the whole probe; a lower peak, since the probe's tokens
    sit in one layer at a time and the layers before it are already compacted."""
    prompt = random_prompt(100, seed=5)

    def run():
        return namm.generate(llama, tokenizer, prompt, KVzip(budget=20), max_new_tokens=12, delay=32,
                             ignore_eos=True, return_logits=True, question=question)

    layerwise = run()
    original = namm.cache.MemoryCache.probe
    def steps_after_the_probe(self, capture=False, steps=None):
        return original(self, capture)

    monkeypatch.setattr(namm.cache.MemoryCache, "probe", steps_after_the_probe)
    after = run()
    assert layerwise.token_ids == after.token_ids
    torch.testing.assert_close(layerwise.logits, after.logits, rtol=0, atol=0)
    assert [(s["n_seen"], s["kept"]) for s in layerwise.stats.steps] == [
        (s["n_seen"], s["kept"]) for s in after.stats.steps]
    assert layerwise.stats.peak_kv_bytes < after.stats.peak_kv_bytes


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@torch.no_grad()
def test_a_probe_leaves_every_layer_as_it_was(kind, tokenizer):
    model = tiny_model(kind)
    ids = tokenizer(random_prompt(70, seed=8), return_tensors="pt").input_ids
    nxt = tokenizer("w9 w10", return_tensors="pt").input_ids
    cache = namm.MemoryCache(model, SnapKV(budget=20, window=4), delay=32)
    model(ids, **with_cache(model, cache))
    before = [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers]
    with cache.probe():
        model(tokenizer(random_prompt(40, seed=9), return_tensors="pt").input_ids, **with_cache(model, cache))
        assert cache.get_seq_length() > 70
    assert all(torch.equal(k, lay.keys) and torch.equal(v, lay.values)
               for (k, v), lay in zip(before, cache.layers, strict=True))
    assert cache.get_seq_length() == 70
    got = model(nxt, **with_cache(model, cache)).logits
    twin = namm.MemoryCache(model, SnapKV(budget=20, window=4), delay=32)
    model(ids, **with_cache(model, twin))
    torch.testing.assert_close(got, model(nxt, **with_cache(model, twin)).logits)


def test_answer_score_is_the_teacher_forced_log_likelihood(llama, tokenizer):
    prompt, answer = random_prompt(60, seed=2), " w7 w8 w9 w10"
    out = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=6, delay=32, answer=answer)
    ids = tokenizer(prompt + answer, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(llama(ids).logits[0, 59:-1].float(), dim=-1)
    expect = logp.gather(-1, ids[0, 60:, None]).sum()
    assert out.answer.tokens == 4 and out.answer.logprob == pytest.approx(float(expect), abs=1e-4)
    assert out.answer.mean_nll == pytest.approx(-float(expect) / 4, abs=1e-4)
    plain = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=6, delay=32)
    assert plain.token_ids == out.token_ids and plain.answer is None  # scoring leaves the cache as it was
    evicting = namm.generate(llama, tokenizer, prompt, SnapKV(budget=8, window=4), max_new_tokens=0, delay=32,
                             answer=answer, max_answer_tokens=2)
    assert evicting.answer.tokens == 2 and evicting.token_ids == []
    assert evicting.answer.logprob != pytest.approx(out.answer.logprob)
