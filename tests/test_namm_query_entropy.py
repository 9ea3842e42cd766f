"""The query-entropy feature (``NAMMConfig.query_entropy_feature``): each token's own attention row as a query,
its entropy normalised by the slots it could see, computed once at the step whose queries include it."""

from __future__ import annotations

import pytest
import torch

import namm
from conftest import prefill_in_chunks, random_prompt
from namm.memory import NAMM, FeatureNormaliser, NAMMConfig, param_count, step_features
from namm.memory.features import QUERY_ENTROPY_KEY
from test_namm_features import blocked_step, make_step

CFG = NAMMConfig(query_entropy_feature=True, spectral_norm="per_head")


def _causal_softmax(b: int, h: int, q: int, t: int, seed: int) -> torch.Tensor:
    """(B, H, Q, T) rows that sum to one over the slots each query can see (the step's queries own the last Q)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, q, t, generator=g) * 3
    logits[..., t - q :].masked_fill_(~torch.ones(q, q, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(-1)


def _expected(att: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Independent reference: entropy of each query row / log(1 + its visible valid slots), per new token."""
    b, h, q, t = att.shape
    out = torch.zeros(b, h, q)
    for j in range(q):
        row = att[:, :, j, : t - q + j + 1]
        p = row.clamp_min(1e-30)
        ent = -(row * p.log()).sum(-1)
        out[:, :, j] = ent / torch.log(1.0 + valid[:, :, : t - q + j + 1].sum(-1).float())
    return out


def test_the_feature_is_off_by_default_and_leaves_old_configs_and_fingerprints_alone():
    assert not NAMMConfig().query_entropy_feature
    assert "query_entropy" not in repr(NAMMConfig()) and "query_entropy_feature" not in NAMMConfig().to_dict()
    assert NAMMConfig.from_dict(NAMMConfig().to_dict()) == NAMMConfig()
    on = NAMMConfig(query_entropy_feature=True)
    assert on.feature_dim == NAMMConfig().feature_dim + 1 and NAMMConfig.from_dict(on.to_dict()) == on
    assert param_count(on) > param_count(NAMMConfig())
    with pytest.raises(namm.NammError, match="query_entropy_feature must be true or false"):
        NAMMConfig(query_entropy_feature=1)


@pytest.mark.parametrize("stream", [False, True])
def test_new_tokens_get_their_row_entropy_old_ones_keep_theirs(stream):
    b, h, q, n_old = 2, 3, 40, 25
    t = n_old + q
    att = _causal_softmax(b, h, q, t, seed=1)
    pos = torch.cat([torch.arange(0, 2 * n_old, 2), torch.arange(100, 100 + q)]).expand(b, h, t).clone()
    step = blocked_step(att, pos, torch.arange(100, 100 + q), []) if stream else make_step(att, pos)
    stored = torch.rand(b, h, t, 1)
    step.state[QUERY_ENTROPY_KEY] = stored.clone()
    feats, _, _ = step_features(step, CFG, FeatureNormaliser())
    state = step.state[QUERY_ENTROPY_KEY]
    assert state.shape == (b, h, t, 1) and feats.shape == (b, h, t, CFG.feature_dim)
    torch.testing.assert_close(state[:, :, :n_old], stored[:, :, :n_old])  # computed once, when first seen
    torch.testing.assert_close(state[:, :, n_old:, 0], _expected(att, step.valid), rtol=1e-5, atol=1e-6)
    # the feature is that state standardised over each head's valid slots
    col = feats[..., -1]
    torch.testing.assert_close(col.mean(-1), torch.zeros(b, h), atol=1e-5, rtol=0)


def test_invalid_slots_hold_no_entropy_and_do_not_count_as_seen():
    b, h, q, t = 1, 2, 16, 48
    att = _causal_softmax(b, h, q, t, seed=2)
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[:, 1, 5:20] = False
    att[:, 1, :, 5:20] = 0.0
    att = att / att.sum(-1, keepdim=True)
    step = make_step(att, torch.arange(t).expand(b, h, t).clone(), valid=valid)
    step_features(step, CFG, FeatureNormaliser())
    state = step.state[QUERY_ENTROPY_KEY]
    assert (state[:, 1, 5:20] == 0).all()
    torch.testing.assert_close(state[:, :, t - q :, 0], _expected(att, valid), rtol=1e-5, atol=1e-6)


def test_a_budgeted_namm_with_the_feature_runs_through_the_cache_and_keeps_its_budget(llama, tokenizer):
    config = NAMMConfig(delay=32, budget=0.5, selection="per_head", spectral_norm="per_head",
                        key_norm_feature=True, query_entropy_feature=True)
    policy = NAMM(config)
    policy.set_params(0.1 * torch.randn(policy.n_params, generator=torch.Generator().manual_seed(0)))
    cache = prefill_in_chunks(llama, tokenizer, policy, random_prompt(150, seed=5), delay=32)
    assert cache.stats.steps
    for layer in cache.managed:
        state = layer.state[QUERY_ENTROPY_KEY]
        assert state.shape[:3] == layer.valid.shape and torch.isfinite(state).all()
        assert (state[layer.valid] > 0).any()
    for record in cache.stats.steps:  # every step keeps exactly its budget per head
        assert (record.kept == -(-record.n_seen // 2)).all(), record
