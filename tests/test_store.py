"""The runtime's pieces on their own: the per-head store, one memory step, the policy's request, the handoff."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers.cache_utils import Cache

import namm
import namm.store
from conftest import random_prompt, tiny_model
from namm.attention import ManagedCall, clear_pending, hand_over, real_tokens, take
from namm.errors import NammError
from namm.evolution.population import generate_copies
from namm.policies import H2O, KVzip, L2Norm, Policy, StepRequest
from namm.policies.base import ALL_QUERIES, read_attention
from namm.step import LayerContext, recompute_attention, run_step, step_view, whole_attention
from namm.store import EvictingLayer

B, H, G, D = 2, 2, 2, 4


def _kv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, t, D, generator=g), torch.randn(B, H, t, D, generator=g)


def _store(t: int = 6) -> EvictingLayer:
    layer = EvictingLayer(3)
    layer.update(*_kv(t))
    return layer


def test_a_store_holds_no_reference_to_a_cache_and_appends_on_its_own():
    layer = EvictingLayer(3)
    assert not any(isinstance(v, Cache) for v in vars(layer).values())
    assert not hasattr(layer, "owner")
    k1, v1 = _kv(4, seed=1)
    k2, v2 = _kv(2, seed=2)
    layer.update(k1, v1)
    keys, values = layer.update(k2, v2)
    torch.testing.assert_close(keys, torch.cat([k1, k2], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v1, v2], dim=2), rtol=0, atol=0)
    assert layer.n_seen == layer.get_seq_length() == 6 and layer.dense
    assert layer.positions[0, 0].tolist() == list(range(6)) and bool(layer.valid.all())
    assert layer.kept_counts().tolist() == [[6, 6], [6, 6]]
    assert layer.nbytes == keys.nbytes + values.nbytes


def test_the_slot_mask_is_validity_plus_causality_over_the_last_call():
    layer = _store(5)
    layer.update(*_kv(3, seed=4))
    layer.mark_padding(torch.tensor([[True, True, True], [False, True, True]]))  # row 1: one padding token
    assert not layer.dense and layer.padded
    assert layer.real[1].tolist() == [True] * 5 + [False, True, True]
    mask = layer.slot_mask(3)  # (B, H, 3, 8)
    assert mask.shape == (B, H, 3, 8)
    assert mask[0, 0].tolist() == [[True] * 6 + [False, False], [True] * 7 + [False], [True] * 8]
    # row 1's padding slot is hidden from every query; the padding query itself sees what it may (unused)
    assert mask[1, 1, 1].tolist() == [True] * 5 + [False, True, False]
    assert mask[1, 1, 2].tolist() == [True] * 5 + [False, True, True]


def _uneven_keep() -> torch.Tensor:
    """Row 0 keeps 2 tokens in head 0 and 3 in head 1; row 1 keeps 1 in each (B = H = 2, 6 slots)."""
    keep = torch.zeros(B, H, 6, dtype=torch.bool)
    keep[0, 0, [1, 4]] = True
    keep[0, 1, [0, 2, 5]] = True
    keep[1, :, [3]] = True
    return keep


def test_compact_keeps_the_chosen_slots_in_position_order_with_their_state(monkeypatch):
    monkeypatch.setattr(namm.store, "RAGGED_MIN_SAVING", 1.0)  # stored whole, padded to the longest head
    layer = _store(6)
    layer.state["s"] = torch.arange(6.0).expand(B, H, 6).clone()
    keep = torch.zeros(B, H, 6, dtype=torch.bool)
    keep[0, 0, [1, 4]] = True
    keep[0, 1, [0, 2, 5]] = True
    keep[1, :, [3]] = True
    before = layer.keys.clone()
    layer.compact(keep)
    assert layer.keys.shape == (B, H, 3, D) and not layer.dense
    assert layer.kept_counts().tolist() == [[2, 3], [1, 1]]
    assert layer.positions[0, 1].tolist() == [0, 2, 5] and layer.positions[0, 0, :2].tolist() == [1, 4]
    assert layer.state["s"][0, 1].tolist() == [0.0, 2.0, 5.0]
    torch.testing.assert_close(layer.keys[0, 1], before[0, 1, [0, 2, 5]], rtol=0, atol=0)
    assert layer.valid[1, 0].tolist() == [True, False, False]
    assert not layer.ragged and layer.nbytes == 2 * B * H * 3 * D * 4


def test_uneven_heads_are_stored_apart_and_a_step_sees_them_stacked_at_the_front():
    """Padding head 0 to head 1's 3 slots would waste 1 of 6 slots per row (>= RAGGED_MIN_SAVING): each head gets
    a store of its own, as long as its longest row, and the step's view stacks them, newest slots last."""
    layer = _store(6)
    layer.state["s"] = torch.arange(6.0).expand(B, H, 6).clone()
    before, values = layer.keys.clone(), layer.values.clone()
    layer.compact(_uneven_keep())
    assert layer.ragged and [h.slots for h in layer.heads] == [2, 3] and layer.slot_shape() == (B, H, 3)
    assert layer.nbytes == 2 * B * (2 + 3) * D * 4 == sum(h.keys.nbytes + h.values.nbytes for h in layer.heads)
    assert layer.storage_slots() == (B * (2 + 3), 2 + 3 + 1 + 1)
    assert layer.kept_counts().tolist() == [[2, 3], [1, 1]]
    assert layer.positions[0, 1].tolist() == [0, 2, 5] and layer.positions[0, 0, 1:].tolist() == [1, 4]
    assert layer.valid[0, 0].tolist() == [False, True, True] and layer.valid[1, 0].tolist() == [False, True, False]
    assert layer.state["s"][0, 0].tolist() == [0.0, 1.0, 4.0] and layer.state["s"][0, 1].tolist() == [0.0, 2.0, 5.0]
    torch.testing.assert_close(layer.keys[0, 0, 1:], before[0, 0, [1, 4]], rtol=0, atol=0)
    torch.testing.assert_close(layer.values[0, 1], values[0, 1, [0, 2, 5]], rtol=0, atol=0)
    assert layer.step_nbytes() == 2 * B * H * 3 * D * 4  # the stacked copy a step works on

    state = layer.state  # a stacked copy: a change is stored by assigning it back
    state["s"] = state["s"] + 10
    layer.state = state
    assert layer.heads[0].state["s"][0, 0].tolist() == [11.0, 14.0]

    k, v = _kv(2, seed=5)  # an append reaches every head; the attention reads the heads one by one
    layer.update(k, v)
    assert [h.slots for h in layer.heads] == [4, 5] and layer.n_seen == 8
    torch.testing.assert_close(layer.keys[:, :, -2:], k, rtol=0, atol=0)
    assert layer.positions[0, 0, -2:].tolist() == [6, 7] and layer.state["s"][0, 0, -2:].tolist() == [0.0, 0.0]
    slots = layer.head_slots(2)
    assert [s[0].shape for s in slots] == [(B, 1, 4, D), (B, 1, 5, D)]
    assert slots[0][2].tolist()[1] == [[[True, False, True, False], [True, False, True, True]]]  # row 1, head 0
    assert layer.head_slots(1)[1][2] is not None  # row 1 of head 1 has padding: a single query needs the mask too

    keep = layer.valid.clone()  # a second compaction compacts each head on its own
    keep[0, 1, -3] = False  # row 0 drops position 5 from head 1
    layer.compact(keep)
    assert layer.kept_counts().tolist() == [[4, 4], [3, 3]] and [h.slots for h in layer.heads] == [4, 4]
    assert layer.positions[0, 1].tolist() == [0, 2, 6, 7]


def test_a_ragged_layer_drops_a_probe_and_indexes_its_batch():
    layer = _store(6)
    layer.compact(_uneven_keep())
    keys_before = layer.keys.clone()
    k, v = _kv(3, seed=6)
    layer.update(k, v)
    probe_q = torch.randn(B, H * G, 3, D)
    layer.keep_probe_queries(probe_q)
    queries, keys = layer.drop_probe(6)
    assert torch.equal(queries, probe_q) and layer.n_seen == 6
    torch.testing.assert_close(keys, k, rtol=0, atol=0)
    torch.testing.assert_close(layer.keys, keys_before, rtol=0, atol=0)
    layer.index_batch(torch.tensor([0, 0, 1]))
    assert layer.slot_shape() == (3, H, 3) and layer.kept_counts().tolist() == [[2, 3], [2, 3], [1, 1]]
    torch.testing.assert_close(layer.keys[1], keys_before[0], rtol=0, atol=0)


def test_index_batch_and_a_dropped_probe_leave_the_store_consistent():
    layer = _store(4)
    layer.keep_queries(torch.randn(B, H * G, 4, D), window=None)
    layer.index_batch(torch.tensor([1, 1, 0]))
    assert layer.keys.shape[0] == 3 and layer.queries.shape[0] == 3 and layer.kept_counts().shape == (3, 2)
    keys_before = layer.keys.clone()
    k, v = torch.randn(3, H, 2, D), torch.randn(3, H, 2, D)
    layer.update(k, v)
    probe_q = torch.randn(3, H * G, 2, D)
    layer.keep_probe_queries(probe_q)
    queries, keys = layer.drop_probe(4)
    assert queries is probe_q or torch.equal(queries, probe_q)
    torch.testing.assert_close(keys, k, rtol=0, atol=0)
    assert layer.n_seen == 4 and layer.probe_queries is None
    torch.testing.assert_close(layer.keys, keys_before, rtol=0, atol=0)


def test_appends_write_in_place_and_never_change_what_was_handed_out():
    """Keys, values, slot metadata, per-token state and kept queries grow inside buffers with headroom: a decoded
    token is written once, nothing held is copied again (the storage stays where it was), and every tensor
    equals the concatenation it replaces. A dropped probe's keys stay intact across the next append."""
    layer = _store(5)
    layer.compact(torch.ones(B, H, 5, dtype=torch.bool))  # per-head metadata from now on
    layer.state["s"] = torch.arange(5.0).expand(B, H, 5).clone()
    layer.keep_queries(torch.zeros(B, H * G, 1, D), window=None)
    expect_keys, expect_state, expect_q = layer.keys.clone(), layer.state["s"].clone(), layer.queries.clone()
    pointers = None
    for i in range(4):
        k, v = _kv(1, seed=10 + i)
        layer.update(k, v)
        q = torch.full((B, H * G, 1, D), float(i + 1))
        layer.keep_queries(q, window=None)
        expect_keys = torch.cat([expect_keys, k], dim=2)
        expect_state = torch.cat([expect_state, torch.zeros(B, H, 1)], dim=2)
        expect_q = torch.cat([expect_q, q], dim=2)
        now = [t.data_ptr() for t in (layer.keys, layer.values, layer.positions, layer.valid, layer.state["s"],
                                      layer.queries)]
        if i >= 1:  # the first append after the compaction and the first kept query start the buffers
            assert now == pointers
        pointers = now
    torch.testing.assert_close(layer.keys, expect_keys, rtol=0, atol=0)
    torch.testing.assert_close(layer.state["s"], expect_state, rtol=0, atol=0)
    torch.testing.assert_close(layer.queries, expect_q, rtol=0, atol=0)
    assert layer.positions[0, 0].tolist() == list(range(9)) and bool(layer.valid.all())
    n_seen = layer.n_seen
    probe_k, probe_v = _kv(3, seed=20)
    layer.update(probe_k, probe_v)
    _, keys = layer.drop_probe(n_seen)
    layer.update(*_kv(3, seed=21))  # written where the probe's slots were
    torch.testing.assert_close(keys, probe_k, rtol=0, atol=0)


def test_kept_queries_follow_the_window():
    layer = _store(2)
    layer.keep_queries(torch.zeros(B, H * G, 3, D), window=4)
    layer.keep_queries(torch.ones(B, H * G, 3, D), window=4)
    assert layer.queries.shape[2] == 4 and layer.queries[0, 0, :, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    layer.mark_stepped()
    assert layer.queries is None and layer.last_step == layer.n_seen


def test_a_memory_step_runs_on_a_bare_store():
    """run_step needs only a store, a policy and the layer's context: no cache, no model."""
    layer = _store(10)
    context = LayerContext(num_layers=4, managed=(1, 3), scaling=0.5)
    record = run_step(layer, L2Norm(budget=4), context)
    norms = _kv(10)[0].norm(dim=-1)  # (B, H, 10): L2Norm keeps the lowest
    expect = norms.argsort(dim=-1)[..., :4].sort(dim=-1).values
    assert torch.equal(layer.positions, expect)
    assert record.layer_idx == 3 and record.n_seen == 10 and record.kept.tolist() == [[4, 4], [4, 4]]
    assert record.before.tolist() == [[10, 10], [10, 10]] and layer.last_step == 10
    assert step_view(layer, context).depth_rank == (1, 2)


def test_recomputed_attention_streams_the_whole_matrix_block_by_block():
    layer = _store(6)
    g = torch.Generator().manual_seed(5)
    layer.keep_queries(torch.randn(B, H * G, 4, D, generator=g), window=None)  # the last 4 slots' queries
    whole = whole_attention(layer, 0.5, None)  # (B, H, 4, 6)
    logits = layer.queries.view(B, H, G, 4, D) @ layer.keys[:, :, None].transpose(-1, -2) * 0.5
    logits[..., 2:] = logits[..., 2:].masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(whole, torch.softmax(logits, dim=-1).mean(dim=2))
    blocks = list(recompute_attention(layer, 0.5, None, [0, 1, 4]))
    assert [tuple(b.shape) for b in blocks] == [(B, H, 1, 3), (B, H, 3, 6)]
    torch.testing.assert_close(torch.cat([torch.nn.functional.pad(blocks[0], (0, 3)), blocks[1]], dim=2), whole)


def test_a_step_carries_the_attention_its_request_asks_for():
    seen = {}

    @dataclass
    class Spy(Policy):
        name = "spy"
        request = StepRequest(queries=2, stream=True)

        def score(self, step):
            seen["step"] = step
            seen["blocks"] = list(read_attention(step, [0, 2]))
            return super().score(step)

    layer = _store(6)
    layer.keep_queries(torch.randn(B, H * G, 5, D), window=2)
    run_step(layer, Spy(), LayerContext(1, (3,), 0.5))
    step = seen["step"]
    assert step.attention is None and step.attention_stream is not None
    assert step.query_positions.tolist() == [4, 5] and seen["blocks"][0].shape == (B, H, 2, 6)
    assert seen["step"].probe is None


def test_step_requests_are_declared_and_checked():
    assert Policy.request == StepRequest() and not Policy.request.attention
    assert H2O.request.queries == ALL_QUERIES and KVzip.request.probe and not namm.policies.Full.request.evicts
    reading = namm.NAMM(params=torch.randn(namm.NAMM().n_params, generator=torch.Generator().manual_seed(0)))
    assert reading.request.stream and not reading.request.probe
    assert not namm.NAMM().request.attention  # zero weights read no attention feature
    for bad in (0, -1, "some", True):
        with pytest.raises(NammError, match="queries"):
            StepRequest(queries=bad)
    with pytest.raises(NammError, match="stream"):
        StepRequest(stream=True)


def test_the_attention_handoff_goes_to_the_layer_it_names():
    clear_pending()
    call = ManagedCall(2, 5, lambda q, real: None, lambda query, softcap: None)
    hand_over(call)
    assert take(1) is None and take(2) is call and take(2) is None
    mask = torch.zeros(2, 1, 3, 5)
    assert real_tokens(mask, 5, 3) is None and real_tokens(None, 5, 3) is None
    mask[1, 0, -1, 2] = float("-inf")  # row 1's first token of the call is padding
    assert real_tokens(mask, 5, 3).tolist() == [[True, True, True], [False, True, True]]


def test_copies_of_one_prompt_need_one_prompt_and_one_copy_is_a_plain_run(llama, tokenizer):
    prompt = random_prompt(40, seed=3)
    one = namm.generate(llama, tokenizer, prompt, H2O(budget=16), max_new_tokens=4, delay=16)
    same = generate_copies(llama, tokenizer, prompt, H2O(budget=16), 1, max_new_tokens=4, delay=16)
    assert same.token_ids == one.token_ids and same.stats.steps == one.stats.steps
    with pytest.raises(NammError, match="single prompt"):
        generate_copies(llama, tokenizer, [prompt, prompt], H2O(budget=16), 2, max_new_tokens=1, delay=16)
    with pytest.raises(NammError, match="single prompt"):
        generate_copies(llama, tokenizer, prompt, H2O(budget=16), 2, question=" w5", max_new_tokens=1)
    with pytest.raises(NammError, match="copies"):
        generate_copies(llama, tokenizer, prompt, H2O(budget=16), 0)


def test_copies_of_a_prompt_share_its_prefix_and_match_separate_runs_for_any_policy(tokenizer):
    model = tiny_model("gemma3")  # sliding layers are copied with the managed ones
    prompt = random_prompt(70, seed=4)
    one = namm.generate(model, tokenizer, prompt, H2O(budget=20), max_new_tokens=5, delay=32, chunk_size=16)
    many = generate_copies(model, tokenizer, prompt, H2O(budget=20), 3, max_new_tokens=5, delay=32, chunk_size=16)
    assert many.token_ids == [one.token_ids] * 3
    assert [s["kept"] for s in many.stats.steps] == [s["kept"] * 3 for s in one.stats.steps]
    assert many.stats.row_mean_kv_tokens == pytest.approx(one.stats.row_mean_kv_tokens * 3, abs=1e-6)
    assert many.stats.mean_kv_tokens == pytest.approx(one.stats.mean_kv_tokens, abs=1e-6)
