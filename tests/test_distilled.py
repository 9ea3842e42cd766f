"""The distilled scorer: KVzip's score predicted from cached keys and values (no probe)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import namm
from conftest import random_prompt, tiny_model, with_cache
from namm.errors import NammError
from namm.policies import Distilled, DistilledScorer, MemoryStep, make_policy
from namm.policies.distilled import token_features


def _scorer(layers=3, heads=2, dim=16, seed=0) -> DistilledScorer:
    g = torch.Generator().manual_seed(seed)
    return DistilledScorer(torch.randn(layers, heads, dim + dim // 2, generator=g),
                           torch.randn(layers, heads, generator=g), {"model": "tiny"})


def _step(b=1, h=2, t=30, d=16, layer_idx=1, seed=0) -> MemoryStep:
    g = torch.Generator().manual_seed(seed)
    return MemoryStep(
        layer_idx=layer_idx, num_layers=3, keys=torch.randn(b, h, t, d, generator=g),
        values=torch.randn(b, h, t, d, generator=g), positions=torch.arange(t).expand(b, h, t).clone(),
        valid=torch.ones(b, h, t, dtype=torch.bool), attention=None, query_positions=None,
        n_seen=t, n_real=torch.full((b,), t),
    )


def test_key_features_do_not_depend_on_the_tokens_position():
    model = tiny_model("llama")
    rope = LlamaRotaryEmbedding(model.config)
    k = torch.randn(1, 2, 1, 16).expand(1, 2, 5, 16).contiguous()  # one key at five positions
    v = torch.randn(1, 2, 5, 16)
    pos = torch.tensor([[0, 7, 100, 513, 1000]])
    cos, sin = rope(k, pos)
    rotated, _ = apply_rotary_pos_emb(k, k, cos, sin)
    assert not torch.allclose(rotated[:, :, 0], rotated[:, :, 3])
    feats = token_features(rotated, v)
    assert feats.shape == (1, 2, 5, 24)
    torch.testing.assert_close(feats[..., :16], v)
    for i in range(1, 5):
        torch.testing.assert_close(feats[:, :, i, 16:], feats[:, :, 0, 16:], rtol=1e-5, atol=1e-5)


def test_scorer_is_linear_per_layer_and_head_and_round_trips(tmp_path):
    scorer = _scorer()
    feats = torch.randn(1, 2, 7, 24)
    got = scorer.score(2, feats)
    for h in range(2):
        torch.testing.assert_close(got[0, h], feats[0, h] @ scorer.weight[2, h] + scorer.bias[2, h])
    scorer.save(tmp_path / "s")
    loaded = DistilledScorer.load(tmp_path / "s")
    torch.testing.assert_close(loaded.weight, scorer.weight)
    torch.testing.assert_close(loaded.bias, scorer.bias)
    assert loaded.meta == {"model": "tiny"} and loaded.digest == scorer.digest


def test_scorer_for_another_model_is_a_one_line_error(tmp_path):
    scorer = _scorer(layers=2)
    with pytest.raises(NammError, match="fitted for 2 layers"):
        scorer.score(2, torch.randn(1, 2, 7, 24))
    with pytest.raises(NammError, match="No distilled scorer"):
        DistilledScorer.load(tmp_path / "missing")


def test_distilled_keeps_the_layers_top_predicted_scores_and_the_sinks(tmp_path):
    _scorer().save(tmp_path / "s")
    step = _step()
    policy = Distilled(budget=10, scorer=str(tmp_path / "s"), sinks=2)
    scores = policy.score(step)
    predicted = _scorer().score(1, token_features(step.keys, step.values))
    keep = policy.keep(step, scores)
    assert int(keep.sum()) == 10 * 2  # the layer keeps budget x heads in all
    assert keep[..., :2].all()  # the sinks
    rest = keep & (step.positions >= 2)
    assert int(rest.sum()) == 20 - 4  # beyond the 2 sinks of each head: the best predictions over both heads
    assert predicted[rest].min() >= predicted[~keep & (step.positions >= 2)].max()


def test_distilled_runs_inside_model_generate_and_keeps_its_budget(llama, tokenizer, tmp_path):
    heads = llama.config.num_key_value_heads
    _scorer(layers=llama.config.num_hidden_layers, heads=heads).save(tmp_path / "s")
    policy = make_policy("distilled", budget=24, scorer=str(tmp_path / "s"))
    assert not policy.request.probe and not policy.request.attention  # no probe, no attention weights: SDPA
    ids = tokenizer(random_prompt(90, seed=3), return_tensors="pt").input_ids
    cache = namm.MemoryCache(llama, policy, delay=16)
    llama.generate(ids, max_new_tokens=6, do_sample=False, **with_cache(llama, cache))
    kept = cache.kept_tokens()  # (layers, 1, heads)
    assert int(kept.max()) < ids.shape[1]  # evicted
    assert (kept.sum(-1) <= 24 * heads + 16).all()  # each layer's total: its budget, plus the tokens since its step
    assert policy.fingerprint().endswith(_scorer(layers=llama.config.num_hidden_layers, heads=heads).digest)


def test_scorer_with_a_hidden_layer_round_trips_and_matches_its_formula(tmp_path):
    g = torch.Generator().manual_seed(1)
    scorer = DistilledScorer(torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, generator=g), {"model": "tiny"},
                             torch.randn(3, 2, 24, 5, generator=g), torch.randn(3, 2, 5, generator=g))
    feats = torch.randn(1, 2, 7, 24)
    got = scorer.score(1, feats)
    for h in range(2):
        hidden = torch.nn.functional.gelu(feats[0, h] @ scorer.hidden_weight[1, h] + scorer.hidden_bias[1, h])
        torch.testing.assert_close(got[0, h], hidden @ scorer.weight[1, h] + scorer.bias[1, h])
    scorer.save(tmp_path / "mlp")
    loaded = DistilledScorer.load(tmp_path / "mlp")
    torch.testing.assert_close(loaded.score(1, feats), got)
    assert loaded.digest == scorer.digest != _scorer().digest
