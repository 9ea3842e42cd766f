"""The budgeted NAMM and depth allocations: exact budgets per head and layer, means that add up."""

from __future__ import annotations

import json

import pytest
import torch

import namm
from conftest import random_prompt, tiny_model
from namm.errors import NammError
from namm.memory import NAMM, NAMMConfig, param_count
from namm.policies import StreamingLLM
from namm.policies.allocation import DepthAllocation, allocate, layer_logits
from namm.policies.base import MemoryStep


@pytest.mark.parametrize("n_layers", [1, 3, 7, 30])
@pytest.mark.parametrize("mean", [0.1, 0.5, 0.9])
def test_allocation_mean_is_exact_and_capped(n_layers, mean):
    knots = torch.tensor([[3.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]])
    frac = allocate(knots, mean, n_layers)
    assert frac.shape == (2, n_layers)
    assert torch.allclose(frac.mean(-1), torch.full((2,), mean, dtype=torch.float64), atol=1e-12)
    assert bool((frac > 0).all()) and bool((frac <= 1.0).all())
    assert torch.allclose(frac[1], torch.full((n_layers,), mean, dtype=torch.float64))  # equal knots: uniform


def test_allocation_follows_relative_depth():
    """The same knots give the same shape of allocation to models of different depth."""
    knots = torch.tensor([-3.0, 3.0])
    for n in (3, 30):
        logits = layer_logits(knots, n)
        assert logits[0] == -3.0 and logits[-1] == 3.0 and bool((logits.diff() > 0).all())
    frac = allocate(knots, 0.5, 30)[0]
    assert bool((frac.diff() >= 0).all()) and frac[-1] == 1.0  # the deepest layers are capped at their whole cache


def test_allocation_refuses_bad_means():
    with pytest.raises(NammError, match="mean budget"):
        allocate(torch.zeros(2), 0.0, 4)
    with pytest.raises(NammError, match="mean budget"):
        allocate(torch.zeros(2), 1.5, 4)


def budget_config(**extra) -> NAMMConfig:
    return NAMMConfig(hop=4, n_fft=8, delay=16, budget=0.5, **extra)


def test_budgeted_config_and_params():
    cfg = budget_config(depth_knots=4, key_norm_feature=True, spectral_norm="per_head")
    assert cfg.feature_dim == cfg.recency_dim + cfg.n_spec + 1
    assert param_count(cfg) == param_count(NAMMConfig(hop=4, n_fft=8, delay=16, key_norm_feature=True)) + 4
    with pytest.raises(NammError, match="depth_knots needs"):
        NAMMConfig(depth_knots=3)
    with pytest.raises(NammError, match="budget"):
        NAMMConfig(budget=1.5)
    with pytest.raises(NammError, match="spectral_norm"):
        NAMMConfig(spectral_norm="local")


def test_old_checkpoints_without_the_new_fields_still_load(tmp_path):
    NAMM().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    for key in ("budget", "depth_knots", "spectral_norm", "key_norm_feature"):
        meta["config"].pop(key)
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = NAMM.from_pretrained(tmp_path, budget=0.25)
    assert loaded.config.budget is None and loaded.active_budget == 0.25


def _step(layer_idx: int, n_layers: int, t: int = 40, b: int = 2, h: int = 3) -> MemoryStep:
    g = torch.Generator().manual_seed(layer_idx)
    pos = torch.arange(t).expand(b, h, t).clone()
    q = 16
    qpos = torch.arange(t - q, t)
    att = torch.rand(b, h, q, t, generator=g) * (pos[:, :, None, :] <= qpos[:, None]).float()
    return MemoryStep(layer_idx=layer_idx, num_layers=n_layers, keys=torch.randn(b, h, t, 4, generator=g),
                      values=torch.zeros(b, h, t, 4), positions=pos, valid=torch.ones(b, h, t, dtype=torch.bool),
                      attention=att, query_positions=qpos, n_seen=t, n_real=torch.full((b,), t))


def test_budgeted_namm_keeps_exactly_its_allocated_budget_per_head():
    cfg = budget_config(depth_knots=3, key_norm_feature=True, spectral_norm="per_head")
    policy = NAMM(cfg, params=torch.randn(param_count(cfg), generator=torch.Generator().manual_seed(1)))
    fractions = allocate(policy.depth_logits(), 0.5, 6)[0]
    kept = []
    for layer in range(6):
        step = _step(layer, 6)
        keep = policy.keep(step, policy.score(step))
        counts = keep.sum(-1)
        expected = int(torch.ceil(40 * fractions[layer] - 1e-9))
        assert bool((counts == expected).all()), (layer, counts, expected)
        kept.append(expected)
    assert abs(sum(kept) / 6 - 20) <= 1  # the layers' mean is the budget (up to rounding up)


def test_budgeted_namm_population_rows_get_their_own_allocation():
    cfg = budget_config(depth_knots=2)
    n = param_count(cfg)
    pop = torch.zeros(2, n)
    pop[0, -2:] = torch.tensor([4.0, -4.0])  # row 0 favours the first layer, row 1 is uniform
    policy = NAMM(cfg)
    policy.set_population(pop)
    step = _step(0, 4)
    counts = policy.keep(step, policy.score(step)).sum(-1)
    assert int(counts[0, 0]) > int(counts[1, 0]) == 20


def test_threshold_checkpoint_run_with_a_budget_keeps_the_top_scores():
    policy = NAMM(NAMMConfig(hop=4, n_fft=8, delay=16), params=torch.randn(param_count(NAMMConfig(hop=4, n_fft=8))),
                  budget=10)
    step = _step(0, 2)
    scores = policy.score(step)
    keep = policy.keep(step, scores)
    assert bool((keep.sum(-1) == 10).all())
    newest = step.positions == step.positions.amax(-1, keepdim=True)
    assert bool(keep[newest].all())  # the newest token is always kept
    others = scores.masked_fill(newest, float("inf"))
    threshold = others.topk(10, dim=-1).values[..., -1:]
    assert bool((keep == (others >= threshold)).all())


def test_streaming_with_a_depth_allocation_follows_it_in_the_runtime(tokenizer):
    model = tiny_model("llama")  # 3 layers
    alloc = DepthAllocation((-2.0, 2.0))
    policy = StreamingLLM(budget=0.5, allocation=alloc)
    out = namm.generate(model, tokenizer, random_prompt(96, seed=4), policy, max_new_tokens=1, delay=32,
                        chunk_size=32)
    fractions = alloc.fractions(0.5, 3)
    for s in out.stats.steps:
        expected = int(torch.ceil(s["n_seen"] * fractions[s["layer"]] - 1e-9))
        assert all(v == expected for row in s["kept"] for v in row), (s, expected)
    assert "depth[-2.00,2.00]" in policy.describe()


def test_budgeted_namm_in_the_runtime_on_gemma_global_layers(tokenizer):
    """Gemma 3's managed layers are its global ones: the allocation is over those two."""
    model = tiny_model("gemma3")
    cfg = NAMMConfig(hop=4, n_fft=8, delay=16, budget=0.4, depth_knots=2, spectral_norm="per_head")
    params = torch.zeros(param_count(cfg))
    params[-2:] = torch.tensor([-1.0, 1.0])
    policy = NAMM(cfg, params=params)
    out = namm.generate(model, tokenizer, random_prompt(64, seed=2), policy, max_new_tokens=1, delay=16,
                        chunk_size=16)
    fractions = allocate(params[-2:], 0.4, 2)[0]
    layers = sorted({s["layer"] for s in out.stats.steps})
    assert layers == [1, 3]
    for s in out.stats.steps:
        expected = int(torch.ceil(s["n_seen"] * fractions[layers.index(s["layer"])] - 1e-9))
        assert all(v == expected for row in s["kept"] for v in row)


def test_budgeted_namm_holds_its_budget_on_a_prompt_shorter_than_its_cadence(tokenizer):
    model = tiny_model("llama")
    cfg = budget_config(depth_knots=2, spectral_norm="per_head")
    policy = NAMM(cfg, params=torch.randn(param_count(cfg), generator=torch.Generator().manual_seed(2)))
    out = namm.generate(model, tokenizer, random_prompt(14, seed=1), policy, max_new_tokens=2, delay=16,
                        chunk_size=16)
    fractions = allocate(policy.depth_logits(), 0.5, 3)[0]
    assert [s["n_seen"] for s in out.stats.steps] == [14, 14, 14]  # one end-of-prompt step per layer
    for s in out.stats.steps:
        assert all(v == int(torch.ceil(14 * fractions[s["layer"]] - 1e-9)) for row in s["kept"] for v in row)


def test_head_sharing_keeps_the_layers_total_with_its_top_scores_over_all_heads():
    cfg = budget_config(head_sharing=True, spectral_norm="per_head", key_norm_feature=True)
    policy = NAMM(cfg, params=torch.randn(param_count(cfg), generator=torch.Generator().manual_seed(4)))
    step = _step(0, 2)
    scores = policy.score(step)
    keep = policy.keep(step, scores)
    counts = keep.sum(-1)  # (B, H)
    assert counts.sum(-1).tolist() == [3 * 20, 3 * 20]  # budget 0.5 of 40 tokens x 3 heads, per row
    assert len(set(counts.flatten().tolist())) > 1  # heads hold different numbers of tokens
    newest = step.positions == step.positions.amax(-1, keepdim=True)
    assert bool(keep[newest].all())
    lifted = scores.masked_fill(newest, float("inf")).flatten(1)
    for row in range(2):
        threshold = lifted[row].topk(60).values[-1]
        assert bool((keep[row].flatten() == (lifted[row] >= threshold)).all())
    with pytest.raises(NammError, match="head_sharing needs"):
        NAMMConfig(head_sharing=True)


def test_head_cap_bounds_every_head_and_keeps_the_layers_total():
    cfg = budget_config(head_sharing=True, head_cap=1.2, spectral_norm="per_head", key_norm_feature=True)
    policy = NAMM(cfg, params=torch.randn(param_count(cfg), generator=torch.Generator().manual_seed(4)))
    step = _step(0, 2)
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 40, generator=g)
    scores[:, 0] += 10.0  # head 0 outranks the others everywhere: uncapped, it would keep all 40
    uncapped = NAMM(budget_config(head_sharing=True, spectral_norm="per_head", key_norm_feature=True),
                    params=policy.params)
    assert uncapped.keep(step, scores)[:, 0].sum(-1).tolist() == [40, 40]
    keep = policy.keep(step, scores)
    counts = keep.sum(-1)
    assert counts.sum(-1).tolist() == [60, 60]  # the layer's total is unchanged
    assert counts[:, 0].tolist() == [24, 24]  # ceil(1.2 x 20)
    newest = step.positions == step.positions.amax(-1, keepdim=True)
    lifted = scores.masked_fill(newest, float("inf"))
    for row in range(2):
        eligible = torch.zeros(3, 40, dtype=torch.bool)
        for h in range(3):
            eligible[h, lifted[row, h].topk(24).indices] = True
        pool = lifted[row].masked_fill(~eligible, float("-inf")).flatten()
        assert set(torch.nonzero(keep[row].flatten()).flatten().tolist()) == set(pool.topk(60).indices.tolist())
    assert "head_cap" not in repr(budget_config(head_sharing=True)) and "head_cap=1.2" in repr(cfg)
    for bad, match in ((0.5, "head_cap must be 0"), (True, "head_cap must be 0"), (float("inf"), "head_cap must")):
        with pytest.raises(NammError, match=match):
            budget_config(head_sharing=True, head_cap=bad)
    with pytest.raises(NammError, match="set NAMMConfig.head_sharing"):
        budget_config(head_cap=1.5)


def test_head_cap_holds_at_every_step_in_the_runtime(tokenizer):
    model = tiny_model("llama")
    # The tiny model's two heads share budgets nearly evenly (e.g. 22 / 26 of 48), so the test uses the tightest cap,
    # 1: then every head keeps exactly the mean.
    cfg = budget_config(head_sharing=True, head_cap=1.0, spectral_norm="per_head", key_norm_feature=True)
    policy = NAMM(cfg, params=torch.randn(param_count(cfg), generator=torch.Generator().manual_seed(2)) * 3)
    uncapped = NAMM(budget_config(head_sharing=True, spectral_norm="per_head", key_norm_feature=True),
                    params=policy.params)

    def over_cap(p: NAMM) -> list[bool]:
        out = namm.generate(model, tokenizer, random_prompt(120, seed=3), p, max_new_tokens=4, delay=16)
        assert len(out.stats.steps) >= 5
        flags = []
        for step in out.stats.steps:
            kept = torch.tensor(step["kept"], dtype=torch.float64)  # (B, H)
            mean = kept.sum(-1, keepdim=True) / kept.shape[-1]
            flags.append(bool((kept > torch.ceil(mean * cfg.head_cap)).any()))
        return flags

    assert not any(over_cap(policy))
    assert any(over_cap(uncapped))  # the cap binds on this prompt


@pytest.mark.parametrize("sharing", [False, True])
def test_sinks_are_kept_in_every_head_whatever_their_scores(sharing):
    """``sinks``: the first real tokens of every head survive, the rest are the top scores, the budget is exact."""
    cfg = budget_config(head_sharing=sharing, sinks=4, spectral_norm="per_head")
    policy = NAMM(cfg, params=torch.zeros(param_count(cfg)))
    step = _step(0, 2)
    step.n_real = torch.tensor([40, 37])  # row 1: three tokens of left padding come first
    step.valid[1, :, :3] = False
    scores = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(3))
    scores[..., :8] = -100.0  # the first tokens score lowest everywhere
    keep = policy.keep(step, scores)
    assert bool(keep[0, :, :4].all()) and not bool(keep[0, :, 4:8].any())
    assert bool(keep[1, :, 3:7].all()) and not bool(keep[1, :, :3].any()) and not bool(keep[1, :, 7].any())
    plain = NAMM(budget_config(head_sharing=sharing, spectral_norm="per_head"), params=policy.params)
    assert not bool(plain.keep(step, scores)[:, :, :8].any())  # without the option they go first
    assert keep.sum((-1, -2)).tolist() == plain.keep(step, scores).sum((-1, -2)).tolist()  # same total
    assert "sinks=4" in repr(cfg) and "sinks" not in repr(budget_config())
    assert "first 4 tokens always kept" in policy.describe()
    with pytest.raises(NammError, match="sinks must be >= 0"):
        budget_config(sinks=-1)


def test_a_checkpoint_with_sinks_round_trips_and_old_ones_load_without(tmp_path):
    cfg = budget_config(head_sharing=True, sinks=4, spectral_norm="per_head")
    NAMM(cfg).save_pretrained(tmp_path / "with")
    assert NAMM.from_pretrained(tmp_path / "with").config.sinks == 4
    assert json.loads((tmp_path / "with" / "config.json").read_text())["config"]["sinks"] == 4
    NAMM(budget_config()).save_pretrained(tmp_path / "without")
    saved = json.loads((tmp_path / "without" / "config.json").read_text())
    assert "sinks" not in json.dumps(saved)  # an old-format file: the option is absent, and loads as 0
    assert NAMM.from_pretrained(tmp_path / "without").config.sinks == 0
