"""Population mode: one prompt, one batch row per NAMM member, shared prefix."""

from __future__ import annotations

import torch

import namm
from conftest import random_prompt
from namm.evolution.population import generate_copies


def test_copies_equal_separate_runs(llama, tokenizer):
    prompt = random_prompt(100, seed=9)
    policy = namm.NAMM()
    g = torch.Generator().manual_seed(0)
    members = torch.randn(3, policy.n_params, generator=g) * 0.3
    members[0] = 0  # the full cache
    policy.set_population(members)
    batch = generate_copies(llama, tokenizer, prompt, policy, 3, max_new_tokens=6, delay=32)
    assert len(batch.token_ids) == 3
    for i in range(3):
        single = namm.NAMM()
        single.set_params(members[i])
        one = namm.generate(llama, tokenizer, prompt, single, max_new_tokens=6, delay=32)
        assert batch.token_ids[i] == one.token_ids
        kept_batch = [(s["layer"], s["n_seen"], s["kept"][i]) for s in batch.stats.steps]
        kept_one = [(s["layer"], s["n_seen"], s["kept"][0]) for s in one.stats.steps]
        assert kept_batch == kept_one
        assert abs(batch.stats.row_mean_kv_tokens[i] - one.stats.row_mean_kv_tokens[0]) < 1e-6
    assert abs(batch.stats.row_cache_fraction[0] - 1.0) < 1e-6
    assert min(batch.stats.row_cache_fraction[1:]) < 1.0


def test_copies_of_a_probing_namm_equal_separate_runs(llama, tokenizer):
    """A NAMM with the reconstruction feature runs its probe on every member's row (the probe tokens are the same
    for every copy of the prompt), so a population equals separate runs, answer scores included."""
    from namm.memory import NAMMConfig, flatten, param_count, unflatten  # noqa: PLC0415

    cfg = NAMMConfig(hop=4, n_fft=8, delay=32, budget=0.5, spectral_norm="per_head", key_norm_feature=True,
                     reconstruction_feature=True, head_sharing=True)
    g = torch.Generator().manual_seed(1)
    members = torch.zeros(3, param_count(cfg))
    for i in range(3):
        named = unflatten(torch.zeros(param_count(cfg)), cfg)
        named["head_weight"][:, 0] = torch.randn(cfg.feature_dim, generator=g)
        members[i] = flatten(named, cfg)
    policy = namm.NAMM(cfg)
    policy.set_population(members)
    prompt = random_prompt(100, seed=9)
    batch = generate_copies(llama, tokenizer, prompt, policy, 3, max_new_tokens=4, delay=32, answer=" w7 w8")
    assert batch.stats.probe_seconds > 0
    assert len({str([s["kept"][i] for s in batch.stats.steps]) for i in range(3)}) > 1  # members keep differently
    for i in range(3):
        one = namm.generate(llama, tokenizer, prompt, namm.NAMM(cfg, params=members[i]), max_new_tokens=4, delay=32,
                            answer=" w7 w8")
        assert batch.token_ids[i] == one.token_ids
        assert [(s["layer"], s["n_seen"], s["kept"][i]) for s in batch.stats.steps] == [
            (s["layer"], s["n_seen"], s["kept"][0]) for s in one.stats.steps]
        assert abs(batch.answer[i].logprob - one.answer.logprob) < 1e-4
