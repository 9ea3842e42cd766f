"""The NAMM policy: config, zero init, selection modes, population mode, statistics, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from namm.errors import NammError
from namm.memory import NAMM, NAMMConfig, param_count, unflatten
from namm.policies.base import ALL_QUERIES, MemoryStep, StepRequest
from namm.policies.selection import threshold_keep


def make_step(b: int = 2, h: int = 2, q: int = 32, t: int = 40, seed: int = 0) -> MemoryStep:
    """Slots at positions 0..t-1 (the last ``q`` born in this step), causal random attention, and (with
    several heads) three invalid slots at the start of head 1 of row 0."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(t).expand(b, h, t).clone()
    qpos = torch.arange(t - q, t)
    att = torch.rand(b, h, q, t, generator=g) * (pos[:, :, None, :] <= qpos[:, None]).float()
    valid = torch.ones(b, h, t, dtype=torch.bool)
    if h > 1:
        valid[0, 1, :3] = False  # e.g. left-padding slots
    return MemoryStep(
        layer_idx=0,
        num_layers=2,
        keys=torch.zeros(b, h, t, 4),
        values=torch.zeros(b, h, t, 4),
        positions=pos,
        valid=valid,
        attention=att,
        query_positions=qpos,
        n_seen=t,
        n_real=torch.full((b,), t),
    )


def slice_step(step: MemoryStep, r: int) -> MemoryStep:
    return MemoryStep(
        layer_idx=step.layer_idx,
        num_layers=step.num_layers,
        keys=step.keys[r : r + 1],
        values=step.values[r : r + 1],
        positions=step.positions[r : r + 1],
        valid=step.valid[r : r + 1],
        attention=None if step.attention is None else step.attention[r : r + 1],
        query_positions=step.query_positions,
        n_seen=step.n_seen,
        n_real=step.n_real[r : r + 1],
        state={k: v[r : r + 1] for k, v in step.state.items()},
    )


def random_vector(seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(param_count(), generator=torch.Generator().manual_seed(seed)) * scale


def keep_all_reading_attention() -> torch.Tensor:
    """Zero scores for every token (keep all), but a non-zero ``qkv`` weight on the first spectrogram bin makes
    the NAMM read the attention features, so it computes its spectrogram state."""
    v = torch.zeros(param_count())
    unflatten(v)["qkv_weight"][8, 0] = 1.0
    return v


# ---------------------------------------------------------------------------- config
def test_config_defaults_and_json_round_trip():
    cfg = NAMMConfig()
    assert (cfg.n_fft, cfg.hop, cfg.n_spec, cfg.carry, cfg.feature_dim) == (32, 16, 17, 16, 25)
    assert cfg.frame_decay == pytest.approx(0.99**16)
    other = NAMMConfig(selection="per_head", bam_hidden=16)
    assert NAMMConfig.from_json(other.to_json()) == other
    assert NAMMConfig.from_dict({"selection": "per_head"}, strict=False).selection == "per_head"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_fft": 31}, "n_fft"),
        ({"hop": 40}, "hop"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"recency_dim": 3}, "recency_dim"),
        ({"selection": "global"}, "selection"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"delay": 500}, "delay"),
        ({"bam_hidden": 2.5}, "bam_hidden"),
        ({"bam_bias": 1}, "bam_bias"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(NammError, match=match):
        NAMMConfig(**kwargs)


def test_config_from_dict_refuses_unknown_and_missing_fields():
    data = NAMMConfig().to_dict()
    with pytest.raises(NammError, match="Unknown NAMM config field"):
        NAMMConfig.from_dict({**data, "temperature": 1.0})
    del data["hop"]
    with pytest.raises(NammError, match="Missing NAMM config field.*hop"):
        NAMMConfig.from_dict(data)
    with pytest.raises(NammError, match="not valid JSON"):
        NAMMConfig.from_json("{")


# ---------------------------------------------------------------------------- policy basics
def test_policy_metadata_and_params():
    p = NAMM()
    assert p.name == "namm" and p.request == StepRequest()  # zero weights read no attention feature
    assert p.get_params().shape == (4172,) and not p.get_params().any()
    v = random_vector(0)
    p.set_params(v)
    assert p.request == StepRequest(queries=ALL_QUERIES, stream=True)
    torch.testing.assert_close(p.get_params(), v)
    p.get_params().zero_()  # a copy
    torch.testing.assert_close(p.get_params(), v)
    with pytest.raises(NammError, match="4172"):
        p.set_params(torch.zeros(5))
    with pytest.raises(NammError, match="NaN"):
        p.set_params(torch.full((4172,), float("nan")))
    assert "identity normalisation" in p.describe()


@pytest.mark.parametrize("selection", ["per_layer", "per_head"])
def test_zero_params_keep_every_valid_token(selection):
    zero = NAMM(NAMMConfig(selection=selection))
    step = make_step()
    scores = zero.score(step)
    assert (scores[step.valid] == 0).all()
    assert torch.equal(zero.keep(step, scores), step.valid)
    assert "namm_ema" not in step.state  # zero weights read no attention feature: no spectrogram state
    p = NAMM(NAMMConfig(selection=selection), params=keep_all_reading_attention())
    step = make_step()
    scores = p.score(step)
    assert (scores[step.valid] == 0).all()
    assert torch.equal(p.keep(step, scores), step.valid)
    assert step.state["namm_ema"].shape == (2, 2, 40, 17)
    assert step.state["namm_carry"].shape == (2, 2, 40, 16)


def test_state_is_carried_across_steps():
    p = NAMM(params=keep_all_reading_attention())
    step = make_step(b=1, h=1, q=32, t=32)
    p.score(step)
    ema = step.state["namm_ema"]
    nxt = make_step(b=1, h=1, q=16, t=48, seed=1)
    nxt.state = {k: torch.cat([v, torch.zeros(1, 1, 16, v.shape[-1])], dim=2) for k, v in step.state.items()}
    p.score(nxt)
    assert not torch.equal(nxt.state["namm_ema"][..., :32, :], ema)
    torch.testing.assert_close(nxt.state["namm_carry"][..., :32, :], nxt.attention[0, 0, :, :32].T[None, None])


# ---------------------------------------------------------------------------- selection
def hand_step() -> tuple[MemoryStep, torch.Tensor]:
    """Row 0: head 0 has 3 non-negative scores, head 1 has 1 (+ the newest). Row 1: 1 and 0 (+ newest)."""
    b, h, t = 2, 2, 6
    pos = torch.arange(t).expand(b, h, t).clone()
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[1, 1, 5] = False  # head (1, 1): the newest valid token is at slot 4
    scores = torch.tensor(
        [
            [[0.5, -1.0, 0.0, 2.0, -3.0, -9.0], [-0.1, 1.0, -0.2, -0.3, -4.0, -0.5]],
            [[-1.0, -2.0, 0.3, -4.0, -5.0, -6.0], [-1.0, -0.5, -2.0, -3.0, -7.0, 5.0]],
        ]
    )
    step = MemoryStep(0, 1, torch.zeros(b, h, t, 1), torch.zeros(b, h, t, 1), pos, valid, None, None, t,
                      torch.full((b,), t))  # fmt: skip
    return step, scores


def test_per_head_selection_keeps_exactly_non_negative_plus_newest():
    step, scores = hand_step()
    keep = NAMM(NAMMConfig(selection="per_head")).keep(step, scores)
    expected = torch.tensor(
        [
            [[1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 1]],
            [[0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(keep, expected)


def test_per_layer_selection_keeps_the_row_max_count_of_top_scores():
    step, scores = hand_step()
    keep = NAMM().keep(step, scores)
    # Row 0: head 0 keeps 4 (3 non-negative + newest) -> head 1 keeps its 4 best: newest, 1.0, -0.1, -0.2.
    # Row 1: head 0 keeps 2 -> head 1 keeps newest valid (slot 4) and its best other (-0.5 at slot 1).
    expected = torch.tensor(
        [
            [[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1]],
            [[0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(keep, expected)
    assert not (keep & ~step.valid).any()
    # Row by row it is exactly the shared threshold_keep rule.
    row = slice_step(step, 0)
    always = torch.zeros_like(row.valid)
    always[..., -1] = True
    assert torch.equal(NAMM().keep(row, scores[:1]), threshold_keep(scores[:1], row.valid, True, always))


def test_newest_not_protected_when_disabled():
    step, scores = hand_step()
    keep = NAMM(NAMMConfig(selection="per_head", always_keep_newest=False)).keep(step, scores)
    assert not keep[0, 0, 5] and not keep[1, 1, 4]


def test_random_params_evict_something_and_keep_newest():
    p = NAMM(NAMMConfig(selection="per_head"), params=random_vector(3))
    step = make_step()
    keep = p.keep(step, p.score(step))
    assert keep.sum() < step.valid.sum()
    assert keep[..., -1].all()


# ---------------------------------------------------------------------------- population mode
@pytest.mark.parametrize("selection", ["per_layer", "per_head"])
def test_population_rows_match_separate_runs(selection):
    k = 3
    cfg = NAMMConfig(selection=selection)
    vectors = torch.stack([random_vector(10 + r) for r in range(k)])
    step = make_step(b=k, seed=7)
    step.state = {"namm_ema": torch.rand(k, 2, 40, 17), "namm_carry": torch.rand(k, 2, 40, 16)}
    singles = [slice_step(step, r) for r in range(k)]
    pop = NAMM(cfg)
    pop.set_population(vectors)
    scores = pop.score(step)
    keep = pop.keep(step, scores)
    assert "population of 3" in pop.describe()
    for r in range(k):
        one = NAMM(cfg, params=vectors[r])
        s = one.score(singles[r])
        torch.testing.assert_close(scores[r : r + 1], s, rtol=1e-5, atol=1e-5)
        assert torch.equal(keep[r : r + 1], one.keep(singles[r], s))
        for key in ("namm_ema", "namm_carry"):
            torch.testing.assert_close(step.state[key][r : r + 1], singles[r].state[key])


def test_population_size_must_match_batch():
    p = NAMM()
    p.set_population(torch.zeros(3, 4172))
    with pytest.raises(NammError, match="3 members but the batch has 2 rows"):
        p.score(make_step(b=2))
    with pytest.raises(NammError, match="members, 4172"):
        p.set_population(torch.zeros(3, 10))
    p.clear_population()
    p.score(make_step(b=2))


# ---------------------------------------------------------------------------- statistics
def test_collect_stats_keeps_everything_then_freezes():
    p = NAMM(params=random_vector(1), collect_stats=True)
    step = make_step()
    keep = p.keep(step, p.score(step))
    assert torch.equal(keep, step.valid)
    assert p.normaliser.count == step.valid.sum().item()
    assert "collecting" in p.describe()
    ema = step.state["namm_ema"][step.valid].double()
    torch.testing.assert_close(p.normaliser.mu, ema.mean(0))
    p.freeze_stats()
    assert not p.collect_stats and "frozen normalisation statistics" in p.describe()
    p.collect_stats = True
    with pytest.raises(NammError, match="frozen"):
        p.score(make_step())


# ---------------------------------------------------------------------------- checkpoints
def trained_policy() -> NAMM:
    p = NAMM(NAMMConfig(selection="per_head"), params=random_vector(5), collect_stats=True)
    p.score(make_step(seed=3))
    p.freeze_stats()
    return p


def test_save_load_round_trip(tmp_path):
    p = trained_policy()
    p.save_pretrained(tmp_path / "ckpt")
    assert {f.name for f in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors"}
    q = NAMM.from_pretrained(tmp_path / "ckpt")
    assert q.config == p.config and q.normaliser.frozen
    torch.testing.assert_close(q.get_params(), p.get_params(), rtol=0, atol=0)
    s1, s2 = make_step(seed=9), make_step(seed=9)
    assert torch.equal(p.score(s1), q.score(s2))
    assert q.describe() == p.describe()
    # Untouched defaults round-trip too (identity normalisation).
    NAMM().save_pretrained(tmp_path / "zero")
    assert "identity" in NAMM.from_pretrained(str(tmp_path / "zero")).describe()
    # Saving again over a checkpoint replaces its two files and leaves the user's other files alone.
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    NAMM().save_pretrained(tmp_path / "ckpt")
    assert {f.name for f in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors", "notes.txt"}
    assert NAMM.from_pretrained(tmp_path / "ckpt").get_params().abs().sum() == 0


def test_corrupt_weights_file(tmp_path):
    trained_policy().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 5)
    with pytest.raises(NammError, match="model.safetensors.*cannot read"):
        NAMM.from_pretrained(tmp_path)


def test_corrupt_config_file(tmp_path):
    trained_policy().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NammError, match="config.json.*not valid JSON"):
        NAMM.from_pretrained(tmp_path)


def edit_config(path, fn) -> None:
    meta = json.loads((path / "config.json").read_text())
    fn(meta)
    (path / "config.json").write_text(json.dumps(meta))


def test_mismatched_shape(tmp_path):
    trained_policy().save_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(bam_hidden=16))
    with pytest.raises(NammError, match="'params' has shape \\(4172,\\)"):
        NAMM.from_pretrained(tmp_path)


def test_missing_and_unknown_config_fields(tmp_path):
    trained_policy().save_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m["config"].pop("ema_decay"))
    with pytest.raises(NammError, match="config.json.*Missing NAMM config field.*ema_decay"):
        NAMM.from_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(ema_decay=0.99, window="boxcar"))
    with pytest.raises(NammError, match="Unknown NAMM config field.*window"):
        NAMM.from_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(NammError, match="format_version"):
        NAMM.from_pretrained(tmp_path)


def test_missing_checkpoint_and_bundled_names(tmp_path):
    with pytest.raises(NammError, match="bundled checkpoint"):
        NAMM.from_pretrained("smollm2-135m-does-not-exist")
    with pytest.raises(NammError, match="config.json.*missing"):
        NAMM.from_pretrained(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NammError, match="is a file"):
        NAMM.from_pretrained(tmp_path / "file")


def test_empty_cache_step():
    step = make_step(b=1, h=2, q=16, t=16)
    empty = slice_step(step, 0)
    empty.positions, empty.valid = step.positions[..., :0], step.valid[..., :0]
    empty.keys, empty.values, empty.attention = step.keys[..., :0, :], step.values[..., :0, :], step.attention[..., :0]
    p = NAMM(params=random_vector(2))
    scores = p.score(empty)
    assert scores.shape == (1, 2, 0) and p.keep(empty, scores).shape == (1, 2, 0)
