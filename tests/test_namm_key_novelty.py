"""The key-novelty feature (``NAMMConfig.key_novelty_feature``): one minus the cosine of a token's key with its
head's mean key (KeyDiff's rule), standardised per head and step."""

from __future__ import annotations

import pytest
import torch

import namm
from conftest import prefill_in_chunks, random_prompt
from namm.memory import NAMM, FeatureNormaliser, NAMMConfig, param_count, step_features
from namm.memory.features import key_novelty
from test_namm_features import make_step


def test_the_feature_is_off_by_default_and_round_trips():
    assert not NAMMConfig().key_novelty_feature and "key_novelty_feature" not in NAMMConfig().to_dict()
    on = NAMMConfig(key_novelty_feature=True)
    assert on.feature_dim == NAMMConfig().feature_dim + 1 and NAMMConfig.from_dict(on.to_dict()) == on
    assert param_count(on) > param_count(NAMMConfig())
    with pytest.raises(namm.NammError, match="key_novelty_feature must be true or false"):
        NAMMConfig(key_novelty_feature="yes")


def test_novelty_is_one_minus_cosine_with_the_mean_of_valid_keys():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 10, 8, generator=g)
    valid = torch.ones(2, 3, 10, dtype=torch.bool)
    valid[1, 2, 6:] = False
    keys[1, 2, 6:] = 1e3  # invalid slots must not move the mean
    got = key_novelty(keys, valid)
    for b in range(2):
        for h in range(3):
            v = valid[b, h]
            mean = keys[b, h, v].mean(0)
            want = 1 - torch.nn.functional.cosine_similarity(keys[b, h, v], mean[None], dim=-1)
            torch.testing.assert_close(got[b, h, v], want, rtol=1e-5, atol=1e-6)
    assert (got[1, 2, 6:] == 0).all()
    # a repeated key sits at the mean: the unique one is the most novel
    rep = torch.ones(1, 1, 6, 4)
    rep[0, 0, 3] = torch.tensor([1.0, -1.0, 0.5, -2.0])
    assert key_novelty(rep, torch.ones(1, 1, 6, dtype=torch.bool))[0, 0].argmax() == 3


def test_the_feature_is_the_last_column_standardised_per_head():
    b, h, q, t = 1, 2, 16, 40
    att = torch.rand(b, h, q, t)
    att = att / att.sum(-1, keepdim=True)
    step = make_step(att, torch.arange(t).expand(b, h, t).clone())
    step.keys = torch.randn(b, h, t, 4, generator=torch.Generator().manual_seed(1))
    cfg = NAMMConfig(key_novelty_feature=True, spectral_norm="per_head")
    feats, _, _ = step_features(step, cfg, FeatureNormaliser())
    col, raw = feats[..., -1], key_novelty(step.keys, step.valid)
    z = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(col, z, rtol=1e-4, atol=1e-4)


def test_a_budgeted_namm_with_the_feature_keeps_its_budget(llama, tokenizer):
    config = NAMMConfig(delay=32, budget=0.5, selection="per_head", spectral_norm="per_head",
                        key_norm_feature=True, key_novelty_feature=True)
    policy = NAMM(config)
    policy.set_params(0.1 * torch.randn(policy.n_params, generator=torch.Generator().manual_seed(0)))
    cache = prefill_in_chunks(llama, tokenizer, policy, random_prompt(150, seed=5), delay=32)
    assert cache.stats.steps
    for record in cache.stats.steps:
        assert (record.kept == -(-record.n_seen // 2)).all(), record
