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
