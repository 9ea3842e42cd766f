"""The NAMM's reconstruction feature: KVzip's probe attention as a token feature of a learned memory."""

from __future__ import annotations

import pytest
import torch

import namm
from conftest import random_prompt, tiny_model, with_cache
from namm.engine import probe_step
from namm.errors import NammError
from namm.memory import NAMM, NAMMConfig, flatten, param_count, unflatten
from namm.memory.features import RECONSTRUCTION_KEY
from namm.policies import KVzip


def reconstruction_namm(budget: float = 0.5, **config) -> NAMM:
    """A NAMM whose score is its log reconstruction attention (the last feature) and nothing else; ``config``: more
    :class:`NAMMConfig` fields (e.g. its keep rule)."""
    cfg = NAMMConfig(hop=4, n_fft=8, delay=16, budget=budget, spectral_norm="per_head", reconstruction_feature=True,
                     **config)
    named = unflatten(torch.zeros(param_count(cfg)), cfg)
    named["head_weight"][-1, 0] = 1.0
    return NAMM(cfg, params=flatten(named, cfg), budget=budget)


def test_the_config_counts_the_feature_and_old_configs_do_not_change():
    cfg = NAMMConfig(reconstruction_feature=True)
    assert cfg.feature_dim == NAMMConfig().feature_dim + 1
    assert "reconstruction_feature" not in repr(NAMMConfig()) and "reconstruction_feature" in repr(cfg)
    assert NAMM(NAMMConfig()).request.probe is False and NAMM(cfg).request.probe is True


def _first_step(model, tokenizer, policy, ids):
    """The cache after the first memory step (a probe step) over ``ids`` (one chunk of the cadence)."""
    cache = namm.MemoryCache(model, policy, delay=ids.shape[1])
    cache.hold_steps()
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        probe_step(model, tokenizer, cache, ids)
    return cache


def test_the_feature_is_kvzips_score_and_the_top_scores_are_kept(tokenizer):
    model = tiny_model("llama")
    ids = tokenizer(random_prompt(40, seed=8), return_tensors="pt").input_ids[:, :16]
    every = _first_step(model, tokenizer, reconstruction_namm(1.0), ids)  # keeps all 16: every token's score
    kvzip = _first_step(model, tokenizer, KVzip(budget=1.0, per_head=True), ids)
    half = _first_step(model, tokenizer, reconstruction_namm(0.5), ids)
    for ours, theirs, kept in zip(every.managed, kvzip.managed, half.managed, strict=True):
        recon = ours.state[RECONSTRUCTION_KEY][0]  # (H, 16)
        assert bool(ours.valid.all()) and recon.shape[-1] == 16
        torch.testing.assert_close(recon, theirs.state["kvzip"][0], rtol=1e-5, atol=1e-7)
        for h in range(recon.shape[0]):
            lifted = recon[h].clone()
            lifted[15] = float("inf")  # the newest token is always kept
            expected = set(lifted.topk(8).indices.tolist())
            assert set(kept.positions[0, h][kept.valid[0, h]].tolist()) == expected


def test_the_namm_runs_its_probe_on_the_cadence_in_the_engine(tokenizer):
    model = tiny_model("llama")
    out = namm.generate(model, tokenizer, random_prompt(70, seed=8), reconstruction_namm(0.5), max_new_tokens=1,
                        delay=16, chunk_size=16)
    assert out.stats.probe_seconds > 0
    assert sorted({s["n_seen"] for s in out.stats.steps})[:4] == [16, 32, 48, 64]
    for s in out.stats.steps:
        assert all(v == -(-s["n_seen"] // 2) for row in s["kept"] for v in row)


def test_a_bare_cache_cannot_run_the_reconstruction_feature(tokenizer):
    model = tiny_model("llama")
    cache = namm.MemoryCache(model, reconstruction_namm(), delay=16)
    with pytest.raises(NammError, match="running the model"):
        model(tokenizer(random_prompt(40), return_tensors="pt").input_ids[:, :32], **with_cache(model, cache))
    namm.cache.clear_pending()


def test_with_kvzips_keep_rule_the_reconstruction_rule_is_kvzip(tokenizer):
    """A NAMM scoring by its raw log reconstruction attention alone, sharing each layer's budget over its heads, its
    first 4 tokens kept and the newest not forced, keeps what KVzip keeps at every step and generates KVzip's logits
    exactly: the shipped memory's rule since session 15 (KVzip word for word on every held-out sample)."""
    model = tiny_model("llama")
    prompt = random_prompt(90, seed=11)

    def run(policy):
        return namm.generate(model, tokenizer, prompt, policy, max_new_tokens=6, delay=16, chunk_size=16,
                             ignore_eos=True, return_logits=True)

    kvzip = run(KVzip(budget=0.5))
    ours = run(reconstruction_namm(0.5, head_sharing=True, sinks=4, always_keep_newest=False))
    # the newest token forced, no sinks: the rule shipped until session 15
    session8_rule = run(reconstruction_namm(0.5, head_sharing=True))
    assert len(kvzip.stats.steps) >= 8 and ours.token_ids == kvzip.token_ids
    assert [s["kept"] for s in ours.stats.steps] == [s["kept"] for s in kvzip.stats.steps]
    assert any(len(set(row)) > 1 for s in ours.stats.steps for row in s["kept"]), "heads must hold different counts"
    torch.testing.assert_close(ours.logits, kvzip.logits, rtol=0, atol=0)
    assert not torch.equal(session8_rule.logits, kvzip.logits)
