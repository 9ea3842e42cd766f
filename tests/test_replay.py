"""Replay evaluation (namm.evolution.replay): one recorded keep-all run scores many members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import namm
from conftest import random_prompt, tiny_model
from namm.errors import NammError
from namm.evolution.recipe import Recipe
from namm.evolution.replay import Recording, ReplayEvaluator, recompute_start, record, replay
from namm.evolution.subspace import Subspace
from namm.memory import NAMMConfig, flatten, param_count, unflatten
from namm.policies import Full, KVzip

DELAY = 32
ANSWER = " w7 w8 w9"


def _config(**extra) -> NAMMConfig:
    return NAMMConfig(hop=4, n_fft=8, delay=DELAY, budget=0.5, spectral_norm="per_head", key_norm_feature=True,
                      reconstruction_feature=True, head_sharing=True, **extra)


def _members(cfg: NAMMConfig, weights: list[dict[int, float]]) -> torch.Tensor:
    """One parameter row per ``{feature index: head weight}``."""
    rows = torch.zeros(len(weights), param_count(cfg))
    for i, w in enumerate(weights):
        named = unflatten(torch.zeros(param_count(cfg)), cfg)
        for j, v in w.items():
            named["head_weight"][j, 0] = v
        rows[i] = flatten(named, cfg)
    return rows


def test_recording_holds_the_prompt_and_the_full_cache_margins(llama, tokenizer):
    prompt = random_prompt(100, seed=3)
    rec = record(llama, tokenizer, prompt, ANSWER, DELAY, DELAY)
    assert rec.ids.shape == (1, 100)
    assert rec.ids[0].tolist() == tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    full = namm.generate(llama, tokenizer, prompt, Full(), max_new_tokens=0, delay=DELAY, answer=ANSWER)
    np.testing.assert_allclose(rec.full_margins, full.answer.margins, atol=1e-4)
    for layer, keys in rec.keys.items():
        assert keys.shape[2] == 100 and rec.values[layer].shape == keys.shape
        assert rec.reconstruction[layer].shape == keys.shape[:3]
        assert bool((rec.reconstruction[layer] > 0).all())  # every token was probed, the last chunk too


def test_recorded_reconstruction_scores_are_kvzips(llama, tokenizer):
    """Under a keep-all cache the recorded score is the one KVzip computes at its steps (its first steps keep all
    tokens too, since KVzip's budget here exceeds the tokens seen)."""
    prompt = random_prompt(96, seed=4)
    rec = record(llama, tokenizer, prompt, ANSWER, DELAY, DELAY)
    seen = {}

    class Spy(KVzip):
        def score(self, step):
            s = super().score(step)
            seen[step.layer_idx] = step.state["kvzip"].clone()
            return s

    namm.generate(llama, tokenizer, prompt, Spy(budget=1.0), max_new_tokens=0, delay=DELAY)
    for layer, scores in seen.items():
        torch.testing.assert_close(rec.reconstruction[layer], scores.float(), atol=1e-6, rtol=1e-5)


def test_replay_recomputing_the_whole_prompt_equals_the_exact_engine(llama, tokenizer):
    """With every token recomputed (``recompute`` >= the prompt) the only approximation left is the recorded
    reconstruction score; a member that gives it no weight must then match separate exact runs."""
    cfg = _config()
    d = cfg.feature_dim
    members = _members(cfg, [{d - 2: 1.0}, {d - 2: -1.0, 0: 0.5}, {3: 1.0}])  # key norm, key norm + recency, ...
    prompt = random_prompt(100, seed=5)
    rec = record(llama, tokenizer, prompt, ANSWER, DELAY, DELAY)
    policy = namm.NAMM(cfg)
    policy.set_population(members)
    margins, fraction = replay(llama, policy, rec, DELAY, DELAY, recompute=1000)
    assert margins.shape == (3, 3) and fraction.shape == (3,)
    assert np.all((fraction > 0.3) & (fraction < 0.9))
    for i in range(3):
        one = namm.generate(llama, tokenizer, prompt, namm.NAMM(cfg, params=members[i]), max_new_tokens=0,
                            delay=DELAY, answer=ANSWER)
        np.testing.assert_allclose(margins[i], one.answer.margins, atol=1e-4)


def test_replay_of_a_member_that_keeps_everything_gives_the_full_margins(llama, tokenizer):
    cfg = _config()
    rec = record(llama, tokenizer, random_prompt(100, seed=6), ANSWER, DELAY, DELAY)
    policy = namm.NAMM(cfg, budget=1.0)
    for recompute in (1, 40, 1000):
        margins, fraction = replay(llama, policy, rec, DELAY, DELAY, recompute=recompute)
        np.testing.assert_allclose(margins[0], rec.full_margins, atol=1e-4)
        assert fraction[0] == pytest.approx(1.0)


def test_replay_rows_are_independent_members(llama, tokenizer):
    cfg = _config()
    d = cfg.feature_dim
    members = _members(cfg, [{d - 1: 1.0}, {d - 2: 1.0}, {d - 1: 1.0, 0: 2.0}])
    rec = record(llama, tokenizer, random_prompt(120, seed=7), ANSWER, DELAY, DELAY)
    policy = namm.NAMM(cfg)
    policy.set_population(members)
    together, _ = replay(llama, policy, rec, DELAY, DELAY, recompute=20)
    for i in range(3):
        alone, _ = replay(llama, namm.NAMM(cfg, params=members[i]), rec, DELAY, DELAY, recompute=20)
        np.testing.assert_allclose(together[i], alone[0], atol=1e-4)
    assert len({tuple(np.round(r, 3)) for r in together}) > 1


def test_recompute_start_is_a_step_boundary_far_enough_from_the_end():
    assert recompute_start(100, 32, 1) == 96
    assert recompute_start(100, 32, 4) == 96
    assert recompute_start(100, 32, 5) == 64
    assert recompute_start(100, 32, 1000) == 0


def test_replay_refuses_attention_features_and_sliding_window_models(llama, tokenizer):
    cfg = _config()
    rec = record(llama, tokenizer, random_prompt(70, seed=8), ANSWER, DELAY, DELAY)
    spectral = _members(cfg, [{10: 1.0}])[0]  # a spectrogram bin
    with pytest.raises(NammError, match="attention features"):
        replay(llama, namm.NAMM(cfg, params=spectral), rec, DELAY, DELAY, recompute=8)
    with pytest.raises(NammError, match="full-attention"):
        record(tiny_model("gemma3"), tokenizer, random_prompt(70, seed=8), ANSWER, DELAY, DELAY)


def test_recording_round_trips_and_refuses_another_setting(llama, tokenizer, tmp_path):
    rec = record(llama, tokenizer, random_prompt(70, seed=9), ANSWER, DELAY, DELAY)
    path = tmp_path / "r.safetensors"
    rec.save(path, {"prompt": "a"})
    back = Recording.load(path, {"prompt": "a"})
    assert back is not None and torch.equal(back.ids, rec.ids)
    for layer in rec.keys:
        assert torch.equal(back.keys[layer], rec.keys[layer])
        assert torch.equal(back.reconstruction[layer], rec.reconstruction[layer])
    np.testing.assert_array_equal(back.full_margins, rec.full_margins)
    assert Recording.load(path, {"prompt": "b"}) is None
    path.write_bytes(b"not safetensors")
    with pytest.raises(NammError, match="replay recording"):
        Recording.load(path, {"prompt": "a"})


def _replay_recipe(**extra) -> Recipe:
    return Recipe.from_dict({
        "model": "tiny", "seed": 3, "population": 4, "samples_per_task": 2, "delay": DELAY, "chunk_size": DELAY,
        "metric": "margin", "members_per_batch": 4, "train_pool": 3, "replay_recompute": 16,
        "policy": {"budget": 0.5, "spectral_norm": "per_head", "key_norm_feature": True,
                   "reconstruction_feature": True, "head_sharing": True},
        "search": {"groups": ["head_weight[0:8]", "head_weight[25:27]"], "start": {"head_weight": [0] * 26 + [1]}},
        "stages": [{"name": "s", "generations": 1, "tasks": [{"name": "passkey", "options": {"length": 120}}]}],
        **extra,
    })


def test_replay_evaluator_scores_training_samples_and_reuses_recordings(llama, tokenizer, tmp_path):
    recipe = _replay_recipe()
    ev = ReplayEvaluator(recipe, tmp_path, model=llama, tokenizer=tokenizer)
    task = recipe.stages[0].tasks[0].key
    assert ev.sample_pool(task, "train") == ["t0", "t1", "t2"]
    start = ev.initial_params()
    assert start.shape == (10,) and start[-1] == 1.0
    params = np.stack([start, start + 0.5, -start, np.zeros_like(start)])
    result = ev.evaluate(params, task, ["t0", "t1"])
    assert result.scores.shape == (4, 2) and np.all((result.scores >= 0) & (result.scores <= 1))
    assert np.all(result.cache_fraction < 0.9)
    np.testing.assert_array_equal(ev.full_scores(task, ["t0", "t1"]), [1.0, 1.0])
    assert len(list((tmp_path / "replay").glob("*.safetensors"))) == 2
    again = ReplayEvaluator(recipe, tmp_path, model=llama, tokenizer=tokenizer)
    second = again.evaluate(params, task, ["t0", "t1"])
    assert again.record_seconds == 0.0  # both recordings read back from disk
    np.testing.assert_allclose(second.scores, result.scores, atol=1e-6)


def test_replay_needs_the_margin_metric():
    with pytest.raises(NammError, match="replay_recompute"):
        _replay_recipe(metric="likelihood")


def test_subspace_searches_a_range_of_a_group():
    cfg = NAMMConfig(budget=0.5, key_norm_feature=True, reconstruction_feature=True, depth_knots=3)
    assert cfg.feature_dim == 27
    s = Subspace(cfg, ["head_weight[25:27]", "head_weight[0:8]", "depth_logits"], {"head_weight": [0] * 26 + [1]})
    assert s.dim == 13 and s.initial()[9] == 1.0
    full = s.embed(np.arange(13.0))
    named = unflatten(torch.as_tensor(full, dtype=torch.float32), cfg)
    assert named["head_weight"][:8, 0].tolist() == list(range(8))
    assert named["head_weight"][25:27, 0].tolist() == [8.0, 9.0]
    assert named["head_weight"][8:25].abs().sum() == 0
    for bad in ("head_weight[5:3]", "head_weight[0:99]", "nope[0:1]"):
        with pytest.raises(NammError):
            Subspace(cfg, [bad])
    with pytest.raises(NammError, match="twice"):
        Subspace(cfg, ["head_weight[0:8]", "head_weight[4:9]"])
