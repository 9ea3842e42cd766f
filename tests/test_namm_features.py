"""NAMM features: STFT, carry, EMA continuity, causal frame mask, recency code, normaliser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from namm.errors import NammError
from namm.memory import FeatureNormaliser, NAMMConfig, recency_code, step_features
from namm.memory.features import hann_window, streamed_spectrogram_ema
from namm.policies.base import MemoryStep

CFG = NAMMConfig()
A = 0.99**16


# ---------------------------------------------------------------- reference implementations (torch.stft, closed form)
def stft_magnitudes(signal: torch.Tensor, n_fft: int = 32, hop: int = 16) -> torch.Tensor:
    """Reference STFT: ``(..., L)`` -> ``(..., F, n_fft // 2 + 1)`` float32 ``|torch.stft|`` (Hann, no centering)."""
    lead, length = signal.shape[:-1], signal.shape[-1]
    n_bins = n_fft // 2 + 1
    if length < n_fft or signal.numel() == 0:
        n_frames = 0 if length < n_fft else (length - n_fft) // hop + 1
        return signal.new_zeros((*lead, n_frames, n_bins), dtype=torch.float32)
    assert (length - n_fft) % hop == 0
    flat = signal.reshape(-1, length).float()
    spec = torch.stft(flat, n_fft=n_fft, hop_length=hop, win_length=n_fft, window=hann_window(n_fft),
                      center=False, normalized=False, onesided=True, return_complex=True)  # (N, n_bins, F)
    return spec.abs().transpose(-1, -2).reshape(*lead, -1, n_bins)


def frame_weights(n_frames: int, a: float) -> torch.Tensor:
    """``(F,)`` float32 EMA weights ``(1 - a) * a ** (F - 1 - f)``: the newest frame gets ``1 - a``."""
    return ((1.0 - a) * a ** torch.arange(n_frames - 1, -1, -1, dtype=torch.float64)).float()


def ema_update(spec: torch.Tensor, old_state: torch.Tensor, birth_frame: torch.Tensor, a: float) -> torch.Tensor:
    """Reference EMA: ``(..., F, K)`` frames -> ``sum_f (1-a) a^(F-1-f) [f >= birth] spec[f] + a^F old_state``."""
    n_frames = spec.shape[-2]
    coef = frame_weights(n_frames, a) * (torch.arange(n_frames) >= birth_frame.unsqueeze(-1))  # (..., F)
    return torch.einsum("...f,...fk->...k", coef, spec.float()) + (a**n_frames) * old_state.float()


def make_step(attention, positions, valid=None, query_positions=None) -> MemoryStep:
    """A MemoryStep from ``attention`` (B, H, Q, T) and ``positions`` (B, H, T)."""
    b, h, q, t = attention.shape
    if valid is None:
        valid = torch.ones(b, h, t, dtype=torch.bool)
    if query_positions is None:
        last = int(positions.max())
        query_positions = torch.arange(last - q + 1, last + 1)
    n_seen = int(query_positions[-1]) + 1 if q else int(positions.max()) + 1
    return MemoryStep(
        layer_idx=0,
        num_layers=1,
        keys=torch.zeros(b, h, t, 4),
        values=torch.zeros(b, h, t, 4),
        positions=positions,
        valid=valid,
        attention=attention,
        query_positions=query_positions,
        n_seen=n_seen,
        n_real=torch.full((b,), n_seen),
    )


def causal_stream(b: int, h: int, n: int, seed: int = 0) -> torch.Tensor:
    """(B, H, n, n) random attention of query p on token j, zero for j > p."""
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(b, h, n, n, generator=g)
    return att * torch.ones(n, n).tril()


def np_stft(x: np.ndarray) -> np.ndarray:
    """(..., L) -> (..., F, 17): |rfft(hann * frame)| over frames of 32 samples with hop 16."""
    m = np.arange(32)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * m / 32)
    n_frames = (x.shape[-1] - 32) // 16 + 1
    frames = np.stack([x[..., 16 * f : 16 * f + 32] for f in range(n_frames)], axis=-2)
    return np.abs(np.fft.rfft(frames * w, axis=-1))


def np_ema(spec: np.ndarray, birth: np.ndarray | None = None) -> np.ndarray:
    """(..., F, K) -> (..., K) closed-form EMA ``sum_f (1-a) a^(F-1-f) [f >= birth] X[f]``."""
    n_frames = spec.shape[-2]
    w = (1 - A) * A ** np.arange(n_frames - 1, -1, -1)
    coef = np.broadcast_to(w, spec.shape[:-1]).copy()
    if birth is not None:
        coef = coef * (np.arange(n_frames) >= birth[..., None])
    return (coef[..., None] * spec).sum(axis=-2)


def test_stft_matches_numpy_formula():
    x = torch.randn(3, 2, 16 + 64, dtype=torch.float64)
    got = stft_magnitudes(x)
    assert got.shape == (3, 2, 4, 17) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_stft(x.numpy()), rtol=1e-5, atol=1e-5)


def test_stft_computes_in_float32_from_bf16():
    x = torch.rand(4, 48).to(torch.bfloat16)
    got = stft_magnitudes(x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_stft(x.float().numpy()), rtol=1e-5, atol=1e-5)


def test_step_features_match_numpy_with_carry():
    b, h, q, t = 1, 2, 64, 5
    g = torch.Generator().manual_seed(1)
    att = torch.rand(b, h, q, t, generator=g)
    positions = torch.arange(t).expand(b, h, t).clone()
    carry = torch.rand(b, h, t, 16, generator=g)
    ema = torch.rand(b, h, t, 17, generator=g)
    step = make_step(att, positions, query_positions=torch.arange(100, 100 + q))
    _, new_ema, new_carry = step_features(step, CFG, FeatureNormaliser(), ema, carry)
    series = np.concatenate([carry.numpy(), att.transpose(-1, -2).numpy()], axis=-1)
    expected = np_ema(np_stft(series)) + A ** (q // 16) * ema.numpy()
    np.testing.assert_allclose(new_ema.numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_carry, att.transpose(-1, -2)[..., -16:])


def test_two_steps_with_carry_equal_one_step_and_closed_form():
    b, h, n = 1, 2, 1024
    att = causal_stream(b, h, n)
    pos = torch.arange(n).expand(b, h, n).clone()

    one = make_step(att, pos, query_positions=torch.arange(n))
    _, ema_one, carry_one = step_features(one, CFG, FeatureNormaliser())

    first = make_step(att[:, :, :512, :512], pos[..., :512].clone(), query_positions=torch.arange(512))
    _, ema1, carry1 = step_features(first, CFG, FeatureNormaliser())
    second = make_step(att[:, :, 512:, :], pos, query_positions=torch.arange(512, n))
    pad = torch.zeros(b, h, 512, 17), torch.zeros(b, h, 512, 16)
    ema_in, carry_in = torch.cat([ema1, pad[0]], dim=2), torch.cat([carry1, pad[1]], dim=2)
    _, ema2, carry2 = step_features(second, CFG, FeatureNormaliser(), ema_in, carry_in)

    stream = np.concatenate([np.zeros((b, h, n, 16)), att.transpose(-1, -2).double().numpy()], axis=-1)
    closed = np_ema(np_stft(stream))  # 64 frames over the whole concatenated stream
    np.testing.assert_allclose(ema_one.numpy(), closed, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ema2.numpy(), closed, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(carry2, carry_one)
    torch.testing.assert_close(carry2, att.transpose(-1, -2)[..., -16:])


@pytest.mark.parametrize("q", [64, 40])
def test_causal_frame_mask_for_tokens_born_in_the_call(q):
    """Tokens born inside the call skip frames before their 16-block even if their signal is non-zero."""
    b, h = 1, 1
    old_pos = torch.tensor([10, 20, 30, 40])
    q0 = 100
    pos = torch.cat([old_pos, torch.arange(q0, q0 + q)]).expand(b, h, -1).clone()
    t = pos.shape[-1]
    g = torch.Generator().manual_seed(2)
    att = torch.rand(b, h, q, t, generator=g)  # deliberately non-causal
    carry = torch.rand(b, h, t, 16, generator=g)  # garbage for new tokens: must be ignored
    ema = torch.rand(b, h, t, 17, generator=g)
    step = make_step(att, pos, query_positions=torch.arange(q0, q0 + q))
    _, new_ema, new_carry = step_features(step, CFG, FeatureNormaliser(), ema, carry)

    pad = (-q) % 16
    is_old = (pos < q0).numpy()
    carry_np = np.where(is_old[..., None], carry.numpy(), 0.0)
    series = np.concatenate([carry_np, np.zeros((b, h, t, pad)), att.transpose(-1, -2).numpy()], axis=-1)
    birth = np.where(is_old, 0, (pos.numpy() - q0 + pad) // 16)
    ema_np = np.where(is_old[..., None], ema.numpy(), 0.0)
    expected = np_ema(np_stft(series), birth) + A ** ((q + pad) // 16) * ema_np
    np.testing.assert_allclose(new_ema.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_carry.numpy(), series[..., -16:], rtol=0, atol=0)
    # The newest token (born at the last query) only gets the last frame.
    last = np_stft(series)[0, 0, -1, -1]
    np.testing.assert_allclose(new_ema[0, 0, -1].numpy(), (1 - A) * last, rtol=1e-5, atol=1e-7)


def test_ema_update_weights():
    w = frame_weights(32, A)
    assert w[-1].item() == pytest.approx(1 - A)
    assert w.sum().item() == pytest.approx(1 - A**32, rel=1e-6)
    spec = torch.ones(2, 3, 17)
    old = torch.full((2, 17), 2.0)
    out = ema_update(spec, old, torch.tensor([0, 2]), A)
    torch.testing.assert_close(out[0], torch.full((17,), (1 - A**3) + 2 * A**3))
    torch.testing.assert_close(out[1], torch.full((17,), (1 - A) + 2 * A**3))


def test_zero_queries_leave_state_unchanged():
    pos = torch.arange(6).view(1, 1, 6)
    ema, carry = torch.rand(1, 1, 6, 17), torch.rand(1, 1, 6, 16)
    step = make_step(torch.zeros(1, 1, 0, 6), pos, query_positions=torch.zeros(0, dtype=torch.long))
    _, new_ema, new_carry = step_features(step, CFG, FeatureNormaliser(), ema, carry)
    torch.testing.assert_close(new_ema, ema)
    torch.testing.assert_close(new_carry, carry)


def test_stored_state_shape_is_checked():
    step = make_step(torch.zeros(1, 1, 16, 4), torch.arange(4).view(1, 1, 4))
    with pytest.raises(NammError, match="namm_ema"):
        step_features(step, CFG, FeatureNormaliser(), torch.zeros(1, 1, 3, 17))


def test_missing_attention_is_a_clear_error():
    step = make_step(torch.zeros(1, 1, 16, 4), torch.arange(4).view(1, 1, 4))
    step.attention = None
    with pytest.raises(NammError, match="attention"):
        step_features(step, CFG, FeatureNormaliser())


def test_recency_code_and_feature_layout():
    code = recency_code(torch.tensor([0, 7]))
    torch.testing.assert_close(code[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    omega = 50000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(code[1].numpy(), np.concatenate([np.sin(7 * omega), np.cos(7 * omega)]), atol=1e-7)

    # Newest valid slot has age 0; the trailing invalid slot is ignored and zeroed.
    pos = torch.tensor([[[3, 8, 12, 0]]])
    valid = torch.tensor([[[True, True, True, False]]])
    att = torch.rand(1, 1, 16, 4)
    step = make_step(att, pos, valid, query_positions=torch.arange(-3, 13))
    feats, ema, carry = step_features(step, CFG, FeatureNormaliser())
    assert feats.shape == (1, 1, 4, 25)
    torch.testing.assert_close(feats[0, 0, :3, :8], recency_code(torch.tensor([9, 4, 0])))
    torch.testing.assert_close(feats[0, 0, :3, 8:], ema[0, 0, :3])  # identity normalisation
    assert not feats[0, 0, 3].any() and not ema[0, 0, 3].any() and not carry[0, 0, 3].any()


def test_normaliser_chan_merge_matches_numpy():
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 3, 5, 17, generator=g) * 3 + 1, torch.randn(4, 17, generator=g)
    v1 = torch.rand(2, 3, 5, generator=g) > 0.3
    v2 = torch.ones(4, dtype=torch.bool)
    norm = FeatureNormaliser()
    torch.testing.assert_close(norm.normalise(x2), x2)  # identity before statistics
    assert "identity" in norm.describe()
    norm.update(x1, v1)
    norm.update(x2, v2)
    ref = torch.cat([x1[v1], x2]).double().numpy()
    np.testing.assert_allclose(norm.mu.numpy(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.sigma.numpy(), ref.std(0), rtol=1e-12)
    assert norm.count == ref.shape[0]
    expected = (x2.double().numpy() - ref.mean(0)) / ref.std(0)
    np.testing.assert_allclose(norm.normalise(x2).numpy(), expected, rtol=1e-5, atol=1e-5)
    norm.freeze()
    assert "frozen" in norm.describe()
    with pytest.raises(NammError, match="frozen"):
        norm.update(x2, v2)


def test_normaliser_refuses_to_freeze_empty_and_clamps_sigma():
    norm = FeatureNormaliser()
    with pytest.raises(NammError, match="none have been collected"):
        norm.freeze()
    norm.update(torch.ones(3, 17), torch.ones(3, dtype=torch.bool))  # zero variance
    out = norm.normalise(torch.full((1, 17), 2.0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((1, 17), 1.0 / 1e-7), rtol=1e-5, atol=0)


def blocked_step(att: torch.Tensor, positions: torch.Tensor, query_positions: torch.Tensor, seen: list) -> MemoryStep:
    """A step that hands its attention out in blocks, as the cache does: ``(B, H, L, V)`` with ``V = T - Q + hi``."""
    b, h, q, t = att.shape

    def blocks(bounds):
        seen.append(list(bounds))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            yield att[:, :, lo:hi, : t - q + hi].contiguous()

    step = make_step(att, positions, query_positions=query_positions)
    step.attention, step.attention_stream = None, blocks
    return step


@pytest.mark.parametrize(("q", "n_old", "block"), [(512, 300, 64), (512, 0, 64), (40, 7, 64), (100, 33, 16),
                                                    (96, 50, 48), (8, 5, 64), (512, 1000, 256)])
def test_streamed_spectrogram_matches_the_reference_stft_and_ema(q, n_old, block):
    """The fast path (blocks, DFT products, closed-form EMA) equals torch.stft + the EMA formula, any block size."""
    b, h = 2, 3
    g = torch.Generator().manual_seed(q + n_old + block)
    t = n_old + q
    q0 = 5000
    old_pos = torch.sort(torch.randperm(q0, generator=g)[:n_old]).values
    pos = torch.cat([old_pos, torch.arange(q0, q0 + q)]).expand(b, h, t).clone()
    att = torch.rand(b, h, q, t, generator=g)
    att[..., n_old:] *= torch.ones(q, q).tril()  # causal over the step's own tokens
    old = (pos < q0)
    carry = torch.rand(b, h, t, 16, generator=g) * old[..., None]
    ema = torch.rand(b, h, t, 17, generator=g) * old[..., None]
    pad = (-q) % 16
    birth = torch.where(old, 0, (pos - q0 + pad) // 16)
    seen: list = []
    step = blocked_step(att, pos, torch.arange(q0, q0 + q), seen)
    new_ema, new_carry = streamed_spectrogram_ema(step, ema, carry, birth, pad, CFG, block=block)
    assert seen and all(bound[-1] == q for bound in seen)

    series = torch.cat([carry, torch.zeros(b, h, t, pad), att.transpose(-1, -2)], dim=-1)
    expected = ema_update(stft_magnitudes(series), ema, birth, A)
    torch.testing.assert_close(new_ema, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_carry, series[..., -16:], rtol=0, atol=0)


def test_streamed_spectrogram_other_window_and_hop():
    """A config with a different n_fft/hop (carry 24, wider than a hop) still matches the reference."""
    cfg = NAMMConfig(n_fft=32, hop=8, delay=64)
    b, h, q, t = 1, 2, 64, 90
    g = torch.Generator().manual_seed(7)
    att = torch.rand(b, h, q, t, generator=g)
    att[..., t - q :] *= torch.ones(q, q).tril()
    pos = torch.arange(t).expand(b, h, t).clone()
    carry = torch.rand(b, h, t, 24, generator=g)
    carry[:, :, t - q :] = 0
    ema = torch.zeros(b, h, t, 17)
    birth = torch.where(pos < t - q, 0, (pos - (t - q)) // 8)
    step = blocked_step(att, pos, torch.arange(t - q, t), [])
    new_ema, new_carry = streamed_spectrogram_ema(step, ema, carry, birth, 0, cfg, block=16)
    series = torch.cat([carry, att.transpose(-1, -2)], dim=-1)
    expected = ema_update(stft_magnitudes(series, 32, 8), ema, birth, 0.99**8)
    torch.testing.assert_close(new_ema, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_carry, series[..., -24:], rtol=0, atol=0)


def test_recency_lookup_equals_the_direct_code():
    from namm.memory.features import _recency_lookup  # noqa: PLC0415

    age = torch.tensor([[0, 1, 7, 4095], [4096, 5000, 70_000, 3]])
    torch.testing.assert_close(_recency_lookup(age, 8, 50_000.0), recency_code(age), rtol=0, atol=0)


def test_non_consecutive_query_positions_still_give_birth_frames():
    """Query positions with gaps (not what the cache produces) fall back to a search; same as the reference."""
    b, h, q = 1, 1, 32
    qpos = torch.cat([torch.arange(100, 116), torch.arange(200, 216)])
    pos = torch.cat([torch.tensor([5, 50]), qpos]).view(1, 1, -1)
    t = pos.shape[-1]
    att = torch.rand(b, h, q, t, generator=torch.Generator().manual_seed(9))
    _, new_ema, _ = step_features(make_step(att, pos, query_positions=qpos), CFG, FeatureNormaliser())
    birth = torch.cat([torch.zeros(2, dtype=torch.long), torch.arange(q) // 16]).view(1, 1, -1)
    series = torch.cat([torch.zeros(b, h, t, 16), att.transpose(-1, -2)], dim=-1)
    torch.testing.assert_close(new_ema, ema_update(stft_magnitudes(series), torch.zeros(b, h, t, 17), birth, A))
