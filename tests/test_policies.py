"""Classic policies and the shared selection machinery."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import namm
from conftest import random_prompt, with_cache
from namm.errors import NammError
from namm.policies import (
    ALL_QUERIES,
    H2O,
    POLICIES,
    BudgetSchedule,
    Full,
    L2Norm,
    MemoryStep,
    Random,
    SnapKV,
    StepRequest,
    StreamingLLM,
    make_policy,
)
from namm.policies.selection import threshold_keep, top_k_keep

BUDGETED = [StreamingLLM(budget=24), H2O(budget=24), L2Norm(budget=24), SnapKV(budget=24, window=8), Random(budget=24)]


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 4), t=st.integers(1, 40), k=st.integers(1, 45), seed=st.integers(0, 10_000)
)
def test_kept_tokens_are_the_top_scores(b, h, t, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, t, generator=g)
    valid = torch.rand(b, h, t, generator=g) > 0.2
    keep = top_k_keep(scores, valid, torch.full((b,), k))
    assert not (keep & ~valid).any()
    for bi in range(b):
        for hi in range(h):
            cand = scores[bi, hi][valid[bi, hi]]
            expect = min(k, cand.numel())
            assert int(keep[bi, hi].sum()) == expect
            if 0 < expect < cand.numel():
                assert scores[bi, hi][keep[bi, hi]].min() > scores[bi, hi][valid[bi, hi] & ~keep[bi, hi]].max()


def test_threshold_selection_modes():
    scores = torch.tensor([[[1.0, -1.0, 0.0, -2.0], [-1.0, -0.5, -3.0, -4.0]]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    newest = torch.zeros_like(valid)
    newest[..., -1] = True
    per_head = threshold_keep(scores, valid, per_layer=False, always=newest)
    assert per_head.tolist() == [[[True, False, True, True], [False, False, False, True]]]
    per_layer = threshold_keep(scores, valid, per_layer=True, always=newest)
    # the first head keeps 3 (two non-negative + newest); every head keeps its 3 best
    assert per_layer.tolist() == [[[True, False, True, True], [True, True, False, True]]]


@pytest.mark.parametrize("policy", BUDGETED, ids=lambda p: p.name)
def test_budgets_are_honoured_and_memory_is_freed(policy, llama, tokenizer):
    prompt = random_prompt(160, seed=4)
    full = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=4, delay=32)
    out = namm.generate(llama, tokenizer, prompt, policy, max_new_tokens=4, delay=32)
    for step in out.stats.steps:
        assert max(max(row) for row in step["kept"]) <= 24
    assert out.stats.kv_bytes < 0.5 * full.stats.kv_bytes
    assert out.stats.peak_kv_bytes < full.stats.peak_kv_bytes
    assert out.stats.mean_kv_tokens < full.stats.mean_kv_tokens
    assert out.stats.peak_kv_tokens <= 24 + 32


def test_fractional_budget_tracks_tokens_seen(llama, tokenizer):
    out = namm.generate(llama, tokenizer, random_prompt(128), L2Norm(budget=0.25), max_new_tokens=2, delay=32)
    for step in out.stats.steps:
        assert max(max(row) for row in step["kept"]) == -(-step["n_seen"] // 4)


def test_fractional_budgets_round_up_exactly_and_the_namm_counts_alike():
    from namm.memory import NAMM, NAMMConfig
    from namm.policies.base import budget_tokens

    step = MemoryStep(layer_idx=0, num_layers=1, keys=torch.zeros(3, 1, 1, 4), values=torch.zeros(3, 1, 1, 4),
                      positions=torch.zeros(3, 1, 1, dtype=torch.long), valid=torch.ones(3, 1, 1, dtype=torch.bool),
                      attention=None, query_positions=None, n_seen=100, n_real=torch.tensor([10, 100, 7]))
    assert budget_tokens(0.7, step).tolist() == [7, 70, 5]  # 10 x 0.7 = 7.000000000000001 in floats: still 7
    assert budget_tokens(0.29, step).tolist() == [3, 29, 3]
    assert budget_tokens(8, step).tolist() == [8, 8, 7]
    assert L2Norm(budget=0.7).budget_tokens(step).tolist() == [7, 70, 5]
    assert NAMM(NAMMConfig(), budget=0.7).budget_tokens(step).tolist() == [7, 70, 5]


def test_budget_schedule_sets_the_cache_size_of_every_step(llama, tokenizer):
    schedule = BudgetSchedule(((64, 40), (96, 70), (128, 20)))
    assert [schedule.at(n) for n in (32, 64, 95, 96, 128, 400)] == [40, 40, 40, 70, 20, 20]
    out = namm.generate(llama, tokenizer, random_prompt(150), H2O(budget=schedule), max_new_tokens=2, delay=32)
    kept = {s["n_seen"]: max(max(row) for row in s["kept"]) for s in out.stats.steps}
    assert kept[32] == 32 and kept[64] == 40 and kept[96] == 70 and kept[128] == 20
    assert "3-step schedule" in H2O(budget=schedule).describe()
    for bad in [(), ((64, 4), (32, 4)), ((64, 0),)]:
        with pytest.raises(NammError, match="BudgetSchedule"):
            BudgetSchedule(bad)


def test_streaming_keeps_sinks_and_recent_window():
    t = 40
    step = MemoryStep(
        layer_idx=0, num_layers=1, keys=torch.zeros(1, 1, t, 4), values=torch.zeros(1, 1, t, 4),
        positions=torch.arange(t).view(1, 1, t), valid=torch.ones(1, 1, t, dtype=torch.bool),
        attention=None, query_positions=None, n_seen=t, n_real=torch.tensor([t]),
    )
    policy = StreamingLLM(budget=10, sinks=4)
    keep = policy.keep(step, policy.score(step))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]


def test_l2norm_keeps_low_norm_keys():
    keys = torch.ones(1, 1, 6, 2) * torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0]).view(1, 1, 6, 1)
    step = MemoryStep(0, 1, keys, keys, torch.arange(6).view(1, 1, 6), torch.ones(1, 1, 6, dtype=torch.bool),
                      None, None, 6, torch.tensor([6]))
    policy = L2Norm(budget=3)
    assert torch.nonzero(policy.keep(step, policy.score(step))[0, 0]).flatten().tolist() == [1, 3, 5]


def test_h2o_accumulates_attention_across_steps(llama, tokenizer):
    cache = namm.MemoryCache(llama, H2O(budget=16), delay=16)
    ids = tokenizer(random_prompt(64), return_tensors="pt").input_ids
    with torch.no_grad():
        for s in range(0, 64, 16):
            llama(ids[:, s : s + 16], **with_cache(llama, cache))
    acc = cache.managed[0].state["h2o_acc"]
    assert acc.shape[:3] == cache.managed[0].positions.shape
    assert float(acc.sum()) > 0


def test_random_is_seeded(llama, tokenizer):
    p = random_prompt(100)
    a = namm.generate(llama, tokenizer, p, Random(budget=20, seed=1), max_new_tokens=3, delay=32)
    b = namm.generate(llama, tokenizer, p, Random(budget=20, seed=1), max_new_tokens=3, delay=32)
    assert a.stats.steps == b.stats.steps and a.token_ids == b.token_ids


def test_registry_lists_every_policy():
    assert set(POLICIES) >= {"full", "streaming", "h2o", "l2", "snapkv", "random"}
    assert isinstance(make_policy("StreamingLLM", budget=8), StreamingLLM)
    assert make_policy("snapkv", budget=0.5, window=16).request.queries == 16


def test_h2o_streamed_sum_equals_the_whole_attention_sum():
    """H2O reads the attention in blocks; its accumulated scores equal the sum of the whole (Q, T) matrix."""
    g = torch.Generator().manual_seed(0)
    b, h, q, t = 2, 3, 300, 420
    att = torch.rand(b, h, q, t, generator=g)
    att[..., t - q :] *= torch.ones(q, q).tril()
    keys = torch.zeros(b, h, t, 4)
    pos = torch.arange(t).expand(b, h, t).clone()
    valid = torch.ones(b, h, t, dtype=torch.bool)
    old = torch.rand(b, h, t, generator=g)
    whole = MemoryStep(0, 1, keys, keys, pos, valid, att, torch.arange(t - q, t), t, torch.tensor([t, t]),
                       state={"h2o_acc": old.clone()})

    def blocks(bounds):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            yield att[:, :, lo:hi, : t - q + hi]

    streamed = MemoryStep(0, 1, keys, keys, pos, valid, None, torch.arange(t - q, t), t, torch.tensor([t, t]),
                          state={"h2o_acc": old.clone()}, attention_stream=blocks)
    policy = H2O(budget=50)
    torch.testing.assert_close(policy.score(streamed), policy.score(whole))
    torch.testing.assert_close(streamed.state["h2o_acc"], old + att.sum(dim=2))
    torch.testing.assert_close(streamed.state["h2o_acc"], whole.state["h2o_acc"])


def test_h2o_streaming_matches_the_recomputed_matrix_in_a_cache(llama, tokenizer):
    """Through the cache: H2O streaming the attention keeps the same tokens as H2O given the whole matrix."""

    class WholeMatrixH2O(H2O):
        request = StepRequest(queries=ALL_QUERIES)

    ids = tokenizer(random_prompt(120), return_tensors="pt").input_ids
    caches = []
    for policy in (H2O(budget=20), WholeMatrixH2O(budget=20)):
        cache = namm.MemoryCache(llama, policy, delay=32)
        with torch.no_grad():
            for s in range(0, ids.shape[1], 16):
                llama(ids[:, s : s + 16], **with_cache(llama, cache))
        caches.append(cache)
    for a, b in zip(caches[0].managed, caches[1].managed, strict=True):
        torch.testing.assert_close(a.state["h2o_acc"], b.state["h2o_acc"], rtol=1e-5, atol=1e-6)
        assert torch.equal(a.positions[a.valid], b.positions[b.valid])
    assert len(caches[0].stats.steps) == len(caches[1].stats.steps) > 0


def test_snapkv_pools_over_valid_neighbours_wherever_the_padding_sits():
    """A head's slots in two layouts: padding between old and new tokens (a store padded to its longest head) and
    none at all. The pooled scores of the valid slots are the same, and with no padding SnapKV pools as kvpress
    does (zero-padded edges counted in the average)."""
    g = torch.Generator().manual_seed(0)
    t, q = 10, 3
    attention = torch.rand(1, 1, q, t, generator=g)
    valid = torch.ones(1, 1, t, dtype=torch.bool)
    valid[..., 4:7] = False  # 3 padding slots inside the head
    attention = attention * valid[:, :, None, :]
    positions = torch.arange(t).view(1, 1, t)

    def scores(att, val, pos):
        n = att.shape[-1]
        step = MemoryStep(layer_idx=0, num_layers=1, keys=torch.zeros(1, 1, n, 4), values=torch.zeros(1, 1, n, 4),
                          positions=pos, valid=val, attention=att, query_positions=torch.arange(n - q, n),
                          n_seen=20, n_real=torch.tensor([20]))
        return SnapKV(budget=4, window=1, kernel=3).score(step)

    padded = scores(attention, valid, positions)
    packed = scores(attention[..., valid[0, 0]], valid[..., valid[0, 0]], positions[..., valid[0, 0]])
    torch.testing.assert_close(padded[..., valid[0, 0]], packed)
    mean = attention.mean(dim=2)[0, 0, valid[0, 0]]
    assert torch.isclose(packed[0, 0, 0], (mean[0] + mean[1]) / 3)  # the left edge: kvpress' zero padding counts
    assert torch.isclose(packed[0, 0, 3], (mean[2] + mean[3] + mean[4]) / 3)  # neighbours across the old padding
