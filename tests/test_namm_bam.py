"""The BAM scorer: parameter layout, zero init, backward mask, population mode."""

from __future__ import annotations

import pytest
import torch

from namm.errors import NammError
from namm.memory import NAMMConfig, bam_scores, flatten, param_count, unflatten
from namm.memory.bam import param_shapes


def random_params(n_rows: int | None = None, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (param_count(),) if n_rows is None else (n_rows, param_count())
    return torch.randn(*shape, generator=g) * scale


def test_param_count_and_layout():
    cfg = NAMMConfig()
    assert param_count(cfg) == 4172
    assert dict(param_shapes(cfg)) == {
        "qkv_weight": (25, 96),
        "qkv_bias": (96,),
        "out_weight": (32, 50),
        "out_bias": (50,),
        "head_weight": (25, 1),
        "head_bias": (1,),
    }
    v = torch.arange(4172, dtype=torch.float32)
    w = unflatten(v)
    assert w["qkv_weight"][1, 0] == 96  # stored in x out, row-major
    assert w["qkv_bias"][0] == 2400
    assert w["out_weight"][0, 0] == 2496 and w["out_weight"][1, 0] == 2546
    assert w["out_bias"][0] == 4096
    assert w["head_weight"][0, 0] == 4146
    assert w["head_bias"][0] == 4171
    torch.testing.assert_close(flatten(w), v)
    rows = torch.randn(3, 4172)
    torch.testing.assert_close(flatten(unflatten(rows)), rows)
    no_bias = NAMMConfig(bam_bias=False)
    assert param_count(no_bias) == 25 * 96 + 32 * 50 + 25
    with pytest.raises(NammError, match="4172"):
        unflatten(torch.zeros(10))


def test_zero_params_give_exactly_zero_scores():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 7, 25, generator=g) * 10
    valid = torch.rand(2, 3, 7, generator=g) > 0.2
    s = bam_scores(feats, valid, torch.zeros(4172))
    assert (s[valid] == 0).all()
    assert torch.isneginf(s[~valid]).all()


def test_backward_mask_ignores_older_tokens_and_invalid_slots():
    g = torch.Generator().manual_seed(1)
    b, h, t = 2, 2, 9
    feats = torch.randn(b, h, t, 25, generator=g)
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[:, :, -2:] = False
    params = random_params()
    base = bam_scores(feats, valid, params)
    i = 4
    changed = feats.clone()
    changed[:, :, :i] = torch.randn(b, h, i, 25, generator=g) * 5  # older tokens
    changed[:, :, -2:] = torch.randn(b, h, 2, 25, generator=g) * 5  # invalid slots
    after = bam_scores(changed, valid, params)
    torch.testing.assert_close(after[:, :, i:-2], base[:, :, i:-2], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, :, :i], base[:, :, :i])
    # A newer token does change the score of an older one.
    newer = feats.clone()
    newer[:, :, i + 1] += 3.0
    assert not torch.allclose(bam_scores(newer, valid, params)[:, :, i], base[:, :, i])


def test_backward_mask_follows_positions_not_slot_order():
    g = torch.Generator().manual_seed(2)
    t = 6
    feats = torch.randn(1, 1, t, 25, generator=g)
    valid = torch.ones(1, 1, t, dtype=torch.bool)
    perm = torch.randperm(t, generator=g)
    params = random_params(seed=3)
    ordered = bam_scores(feats, valid, params)
    shuffled = bam_scores(feats[:, :, perm], valid, params, positions=perm.view(1, 1, t))
    torch.testing.assert_close(shuffled, ordered[:, :, perm], rtol=1e-5, atol=1e-6)


def test_population_rows_match_single_runs():
    g = torch.Generator().manual_seed(4)
    k, h, t = 3, 2, 8
    feats = torch.randn(k, h, t, 25, generator=g)
    valid = torch.rand(k, h, t, generator=g) > 0.2
    pop = random_params(k, seed=5)
    batched = bam_scores(feats, valid, pop)
    for r in range(k):
        single = bam_scores(feats[r : r + 1], valid[r : r + 1], pop[r])
        torch.testing.assert_close(batched[r : r + 1], single, rtol=1e-5, atol=1e-6)
    with pytest.raises(NammError, match="one row per batch row"):
        bam_scores(feats, valid, pop[:2])


def test_multi_head_and_bias_free_configs_run():
    cfg = NAMMConfig(bam_heads=2, bam_hidden=8, bam_bias=False, recency_dim=4)
    feats = torch.randn(1, 2, 5, cfg.feature_dim)
    s = bam_scores(feats, torch.ones(1, 2, 5, dtype=torch.bool), torch.randn(param_count(cfg)) * 0.1, cfg)
    assert s.shape == (1, 2, 5) and torch.isfinite(s).all()


def _reference_scores(features, valid, params, cfg=None, positions=None):
    """The BAM with every shortcut off: the attention always computed."""
    from namm.memory.bam import _bam_scores  # noqa: PLC0415

    return _bam_scores(features, valid, params, cfg, positions, shortcuts=False)


@pytest.mark.parametrize("zero", ["value", "qkv", "out"])
@pytest.mark.parametrize("rows", [None, 3])
def test_attention_shortcuts_are_exact(zero, rows):
    """Zero value weights (attention = value bias) or zero output weights ([r, m] = output bias) skip the BAM
    attention; the scores equal the full computation's."""
    g = torch.Generator().manual_seed(11)
    b, h, t = 3, 2, 40
    feats = torch.randn(b, h, t, 25, generator=g) * 3
    valid = torch.rand(b, h, t, generator=g) > 0.2
    positions = torch.randperm(t, generator=g).expand(b, h, t).clone()
    params = random_params(rows, seed=12, scale=0.5)
    w = unflatten(params)
    if zero == "value":
        w["qkv_weight"][..., 64:] = 0.0
    elif zero == "qkv":
        w["qkv_weight"].zero_()
    else:
        w["out_weight"].zero_()
    fast = bam_scores(feats, valid, params, positions=positions)
    ref = _reference_scores(feats, valid, params, positions=positions)
    assert torch.isfinite(fast[valid]).all() and fast[valid].std() > 0  # the scores still depend on the features
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_attention_shortcut_needs_every_population_row_zero():
    pop = random_params(2, seed=13)
    unflatten(pop)["qkv_weight"][0, :, 64:] = 0.0  # row 0 only
    g = torch.Generator().manual_seed(14)
    feats, valid = torch.randn(2, 1, 9, 25, generator=g), torch.ones(2, 1, 9, dtype=torch.bool)
    torch.testing.assert_close(bam_scores(feats, valid, pop), _reference_scores(feats, valid, pop), rtol=0, atol=0)


@pytest.mark.parametrize("t", [1, 7, 16, 33])
@pytest.mark.parametrize("window", [1, 4, 8])
def test_windowed_bam_matches_a_banded_mask(t, window):
    """bam_window: each token attends to itself and its window - 1 next newer valid tokens."""
    from namm.memory.bam import _windowed_causal_attention  # noqa: PLC0415

    g = torch.Generator().manual_seed(t * 10 + window)
    q, k, v = (torch.randn(2, 1, t, 5, generator=g) for _ in range(3))
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    band = (j <= i) & (j > i - window)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
    torch.testing.assert_close(_windowed_causal_attention(q, k, v, window), expected, rtol=1e-5, atol=1e-6)


def test_windowed_bam_follows_positions_and_ignores_far_newer_tokens():
    cfg = NAMMConfig(bam_window=3)
    g = torch.Generator().manual_seed(15)
    b, h, t = 1, 2, 12
    feats = torch.randn(b, h, t, 25, generator=g)
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[:, :, 5] = False
    params = random_params(seed=16)
    base = bam_scores(feats, valid, params, cfg)
    assert torch.isfinite(base[valid]).all()
    far = feats.clone()
    far[:, :, 10:] += 5.0  # more than 2 valid tokens newer than token 3 (4, 6 are its window)
    after = bam_scores(far, valid, params, cfg)
    torch.testing.assert_close(after[:, :, :4], base[:, :, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, :, 8:10], base[:, :, 8:10])  # within their windows
    full = bam_scores(feats, valid, params, NAMMConfig(bam_window=0))
    torch.testing.assert_close(bam_scores(feats, valid, params, NAMMConfig(bam_window=t)), full, rtol=1e-5, atol=1e-6)
    assert NAMMConfig.from_dict(cfg.to_dict()) == cfg and "bam_window" not in NAMMConfig().to_dict()
    assert "bam_window" not in repr(NAMMConfig()) and "bam_window=3" in repr(cfg)
