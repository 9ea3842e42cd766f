"""NAMM token features (spec section 2): attention spectrogram, EMA over frames, recency code.

For every cached token of every KV head, the attention it received from the ``Q`` queries of the current
memory step is read as a time series (query order = time), prefixed with the last ``n_fft - hop`` = 16
values it received at the previous step (the carry; zeros for tokens born since), and turned into a
magnitude STFT (periodic Hann window 32, hop 16, no centering, one-sided -> 17 bins, ``Q / 16`` frames).
The frames are folded into a per-token EMA state with per-frame decay ``a = 0.99 ** 16``: frame ``f`` of
``F`` gets weight ``(1 - a) * a ** (F - 1 - f)`` and the previous state decays by ``a ** F``. A token
born inside the step at local query index ``n`` only receives frames ``f >= n // 16`` (no renormalisation).
The state is normalised with global statistics (:class:`FeatureNormaliser`) and prefixed with an 8-dim
sinusoidal code of the token's age -> 25 features.

Deviations from the reference (which raises when ``Q`` is not a multiple of ``hop``):

* ``Q % hop != 0`` (e.g. a one-shot prefill through ``model.generate`` whose memory step sees the whole
  prompt): the signal is left-padded with zeros to the next multiple of ``hop``, i.e. the series is
  ``[carry, zeros(pad), attention(Q)]``, and the local birth index of a new token is shifted by ``pad``.
  The next carry is the last ``n_fft - hop`` samples of that padded series (for ``Q >= 16``: the last 16
  attention values).
* ``Q == 0``: no frames; the state and carry are returned unchanged (``a ** 0 = 1``).
* The recency code is computed directly (float64, then float32) instead of from a 32,769-row table, so
  there is no maximum age.
* Statistics use the population variance (sum of squared deviations / count).
"""

from __future__ import annotations

import functools
import math

import torch

from namm.errors import NammError
from namm.memory.config import NAMMConfig
from namm.policies.base import MemoryStep, read_attention

EMA_KEY = "namm_ema"
CARRY_KEY = "namm_carry"
#: ``(B, H, T)`` per-token state: the reconstruction attention each token received (reconstruction_feature), written
#: by :class:`~namm.memory.policy.NAMM` from the step's probe.
RECONSTRUCTION_KEY = "namm_reconstruction"
#: ``(B, H, T, 1)`` per-token state: the normalised entropy of the token's own query row (query_entropy_feature).
QUERY_ENTROPY_KEY = "namm_query_entropy"


def hann_window(
    n_fft: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(n_fft,)`` periodic Hann window ``0.5 - 0.5 cos(2 pi m / n_fft)`` (float32 unless ``dtype`` says)."""
    return torch.hann_window(n_fft, periodic=True, dtype=dtype, device=device)


def _float64_device(device: torch.device) -> torch.device:
    """``device``, or the CPU for backends without float64 (Apple MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def recency_code(age: torch.Tensor, dim: int = 8, max_freq: float = 50_000.0) -> torch.Tensor:
    """Sinusoidal age code.

    Args:
        age: ``(...)`` integer or float ages (0 = newest token).

    Returns:
        ``(..., dim)`` float32 ``[sin(age * w_0..w_{h-1}), cos(age * w_0..w_{h-1})]``, ``w_k = max_freq ** (-k/h)``,
        ``h = dim // 2``.
    """
    half = dim // 2
    work = _float64_device(age.device)
    omega = max_freq ** (-torch.arange(half, dtype=torch.float64, device=work) / half)
    angle = age.to(work).double().unsqueeze(-1) * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float().to(age.device)


@functools.lru_cache(maxsize=8)
def _recency_table(rows: int, dim: int, max_freq: float, device: torch.device) -> torch.Tensor:
    """``(rows, dim)`` float32 :func:`recency_code` of ages ``0 .. rows - 1`` (cached; do not modify)."""
    return recency_code(torch.arange(rows, device=device), dim, max_freq)


def _recency_lookup(age: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """:func:`recency_code` of ``(...)`` non-negative integer ages, read from a cached table (the same values)."""
    if age.numel() == 0:
        return recency_code(age, dim, max_freq)
    rows = 1 << max(12, int(age.max()).bit_length())  # powers of two: few tables however long the context
    return _recency_table(rows, dim, max_freq, age.device)[age]


class FeatureNormaliser:
    """Global mean/std of the spectral features, merged over valid tokens with Chan's parallel update.

    Until a token has been seen it is the identity (mean 0, std 1). ``freeze()`` stops updates; the
    statistics live in the checkpoint (``mu``, ``sigma``, ``count``). Stored in float64 on the CPU.
    """

    def __init__(self, dim: int = 17, eps: float = 1e-7) -> None:
        self.dim = dim
        self.eps = eps
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)
        self.count = 0.0
        self.frozen = False
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def mu(self) -> torch.Tensor:
        """``(dim,)`` float64 mean (zeros before any statistics)."""
        return self.mean.clone()

    @property
    def sigma(self) -> torch.Tensor:
        """``(dim,)`` float64 population standard deviation (ones before any statistics)."""
        if self.count == 0:
            return torch.ones(self.dim, dtype=torch.float64)
        return (self.m2 / self.count).sqrt()

    def update(self, x: torch.Tensor, valid: torch.Tensor) -> None:
        """Merge the statistics of ``x[valid]``. ``x``: ``(..., dim)``; ``valid``: ``(...)`` bool."""
        if self.frozen:
            raise NammError("The NAMM normalisation statistics are frozen; they can no longer be updated.")
        sel = x[valid]
        sel = sel.to(_float64_device(sel.device)).double()
        n = sel.shape[0]
        if n == 0:
            return
        batch_mean = sel.mean(dim=0)
        batch_m2 = ((sel - batch_mean) ** 2).sum(dim=0)
        batch_mean, batch_m2 = batch_mean.cpu(), batch_m2.cpu()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total
        self._cache.clear()

    def freeze(self) -> None:
        """Stop updating. Refused before any statistics were collected."""
        if self.count == 0:
            raise NammError("Cannot freeze the NAMM normalisation statistics: none have been collected yet.")
        self.frozen = True

    def load(self, mu: torch.Tensor, sigma: torch.Tensor, count: float, frozen: bool) -> None:
        """Restore statistics saved from :attr:`mu`, :attr:`sigma` and :attr:`count`."""
        if mu.shape != (self.dim,) or sigma.shape != (self.dim,):
            raise NammError(
                f"Normalisation statistics must have shape ({self.dim},), got {tuple(mu.shape)} and "
                f"{tuple(sigma.shape)}."
            )
        if count < 0 or (count == 0 and frozen):
            raise NammError(f"Invalid normalisation statistics count {count} (frozen={frozen}).")
        self.count = float(count)
        self.mean = mu.double().cpu().clone() if count else torch.zeros(self.dim, dtype=torch.float64)
        self.m2 = (sigma.double().cpu() ** 2) * self.count
        self.frozen = bool(frozen)
        self._cache.clear()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` -> float32 ``(x - mu) / max(sigma, eps)``."""
        dev = x.device
        if dev not in self._cache:
            self._cache[dev] = (self.mu.float().to(dev), self.sigma.clamp(min=self.eps).float().to(dev))
        mu, sigma = self._cache[dev]
        return (x.float() - mu) / sigma

    def describe(self) -> str:
        if self.count == 0:
            return "identity normalisation (no statistics collected)"
        state = "frozen" if self.frozen else "collecting"
        return f"{state} normalisation statistics ({int(self.count):,} token features)"


def newest_position(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, H, 1)``: the largest position among the valid slots of each head (``-2**62`` if there are none)."""
    masked = positions.masked_fill(~valid, -(2**62))
    if masked.shape[-1] == 0:
        return masked.new_full((*masked.shape[:-1], 1), -(2**62))
    return masked.amax(dim=-1, keepdim=True)


def _stored(state: torch.Tensor | None, shape: tuple[int, ...], name: str, like: torch.Tensor) -> torch.Tensor:
    """The stored per-token state, or zeros when it does not exist yet."""
    if state is None:
        return like.new_zeros(shape, dtype=torch.float32)
    if tuple(state.shape) != shape:
        raise NammError(f"NAMM state {name!r} has shape {tuple(state.shape)}, expected {shape}.")
    return state.float()


@functools.lru_cache(maxsize=8)
def dft_basis(n_fft: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(2K, n_fft)`` float32 windowed one-sided DFT, ``K = n_fft // 2 + 1``: rows ``k < K`` hold
    ``w[m] cos(2 pi k m / n_fft)``, rows ``K + k`` hold ``-w[m] sin(2 pi k m / n_fft)`` (``w`` periodic Hann).

    Built in float64 once per ``(n_fft, device)`` and cached: every memory step of every layer reuses it
    (callers must not modify it in place).
    """
    m = torch.arange(n_fft, dtype=torch.float64, device=_float64_device(torch.device(device or "cpu")))
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=m.device)
    angle = 2.0 * torch.pi * k[:, None] * m[None, :] / n_fft
    window = hann_window(n_fft, m.device, dtype=torch.float64)
    return torch.cat([window * torch.cos(angle), -window * torch.sin(angle)]).float().to(device)


def _query_bounds(q: int, pad: int, hop: int, block: int) -> list[int]:
    """Query block bounds ``[0, ..., q]`` such that ``pad + bound`` is a multiple of ``hop`` (whole frames)."""
    step = max(hop, block // hop * hop)
    return [0, *range(step - pad, q, step), q]  # pad < hop <= step, and pad + q is a multiple of hop


def _magnitudes(spec: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., 2K, V)`` real and imaginary rows -> ``(..., K, V)`` magnitudes in one pass (into ``out`` if given)."""
    return torch.hypot(spec[..., :k, :], spec[..., k:, :], out=out)


def _scratch(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous ``shape`` view of the front of a flat ``buffer`` (reused: no fresh pages per frame)."""
    return buffer[: math.prod(shape)].view(shape)


def streamed_spectrogram_ema(
    step: MemoryStep,
    old_ema: torch.Tensor,
    old_carry: torch.Tensor,
    birth_frame: torch.Tensor,
    pad: int,
    config: NAMMConfig,
    block: int = 64,
    entropy_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one memory step's attention into the EMA of its STFT magnitudes, streaming over query blocks.

    Computes the magnitude STFT of every token's series ``[carry, zeros(pad), attention]`` and its EMA
    ``sum_f (1-a) a^(F-1-f) [f >= birth] |X_f| + a^F old`` (spec section 2.3-2.4), in the query-major layout
    the attention comes in: each frame is one product of the windowed DFT basis (:func:`dft_basis`) with the
    ``n_fft`` attention rows it covers, its magnitudes are added at once, with their closed-form weight, to
    a running sum that starts at ``a^F`` times the old state. Only one block of ``block`` queries' attention
    exists at a time (see :func:`namm.step.recompute_attention`), never the whole ``(Q, T)``
    matrix, and the series is never assembled: the carried samples enter the frames that cover them through
    their own product, the zero padding through none. The birth mask touches only the step's own tokens
    (its last ``Q`` slots, in order). A product with the DFT basis costs less here than ``torch.fft.rfft``
    over framed copies (measured: about 3x, one thread, 128 queries x 2048 slots).

    Args:
        step: the memory step (its attention, whole or in blocks).
        old_ema: ``(B, H, T, K)`` state before the step, zero for tokens born in it.
        old_carry: ``(B, H, T, n_fft - hop)`` previous step's last attention values, zero for new tokens.
        birth_frame: ``(B, H, T)`` int64 first frame each token may receive (0 for old tokens).
        pad: zero queries in front of the step's ``Q`` so that ``pad + Q`` is a multiple of ``hop``.
        entropy_out: optional ``(B, H, Q)`` float32 buffer, filled with each query row's attention entropy
            (nats; zero for padding rows) from the same blocks, so the attention is read once.

    Returns:
        ``new_ema`` ``(B, H, T, K)`` and ``new_carry`` ``(B, H, T, n_fft - hop)``, both float32.
    """
    b, h, t, k = old_ema.shape
    n_fft, hop, n_carry, a = config.n_fft, config.hop, config.carry, config.frame_decay
    q = step.query_positions.shape[0]
    n_frames = (q + pad) // hop
    basis = dft_basis(n_fft, old_ema.device)
    weights = ((1.0 - a) * a ** torch.arange(n_frames - 1, -1, -1, dtype=torch.float64)).tolist()
    acc = (old_ema * a**n_frames).transpose(-1, -2).contiguous()  # (B, H, K, T): the attention's layout
    # The series not yet framed, as (B, H, rows, width) pieces in time order; a piece is zero past its width.
    tail = [old_carry.transpose(-1, -2).contiguous()]
    first_new = max(t - q, 0)  # the step's queries' own tokens are its last q slots, in order
    frame = 0
    bounds = _query_bounds(q, pad, hop, block)
    spec_buf, mag_buf = acc.new_empty(b * h * 2 * k * t), acc.new_empty(b * h * k * t)  # reused by every frame
    for i, att in enumerate(read_attention(step, bounds)):
        vis = att.shape[-1]
        if entropy_out is not None:
            entropy_out[:, :, bounds[i] : bounds[i + 1]] = -torch.xlogy(att, att).sum(-1)
        pieces = [*tail, *([old_ema.new_zeros(b, h, pad, 0)] if i == 0 and pad else []), att]
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + piece.shape[2])
        for start in range(0, starts[-1] - n_fft + 1, hop):
            spec = None
            for piece, offset in zip(pieces, starts, strict=False):  # rows of [start, start + n_fft) per piece
                lo, hi = max(start, offset), min(start + n_fft, offset + piece.shape[2])
                if lo >= hi or piece.shape[-1] == 0:
                    continue
                rows, width = basis[:, lo - start : hi - start], piece[:, :, lo - offset : hi - offset, :vis]
                if spec is None and width.shape[-1] == vis:
                    spec = torch.matmul(rows, width, out=_scratch(spec_buf, b, h, 2 * k, vis))
                    continue
                if spec is None:
                    spec = _scratch(spec_buf, b, h, 2 * k, vis).zero_()
                spec[..., : width.shape[-1]] += torch.matmul(rows, width)
            if spec is not None:
                mag = _magnitudes(spec, k, out=_scratch(mag_buf, b, h, k, vis))  # (B, H, K, V)
                if vis > first_new:
                    late = birth_frame[:, :, first_new:vis] > frame
                    mag[..., first_new:].masked_fill_(late[:, :, None, :], 0.0)
                acc[..., :vis].add_(mag, alpha=weights[frame])
            frame += 1
        # The last n_carry rows of the series: what the next block's first frame (or the next step) starts with.
        need, tail = n_carry, []
        for piece in reversed(pieces):
            if need == 0:
                break
            take = min(piece.shape[2], need)
            tail.insert(0, piece[:, :, piece.shape[2] - take :])
            need -= take
    new_carry = old_carry.new_zeros(b, h, t, n_carry)
    row = 0
    for piece in tail:
        new_carry[:, :, : piece.shape[-1], row : row + piece.shape[2]] = piece.transpose(-1, -2)
        row += piece.shape[2]
    return acc.transpose(-1, -2).contiguous(), new_carry


def attention_feature_indices(config: NAMMConfig) -> list[int]:
    """Indices, in a token's feature vector, of the features computed from the step's attention weights: the
    ``n_spec`` spectrogram bins and the query entropy (the recency code, key norm, key novelty and
    reconstruction attention need no attention weights)."""
    spectral = list(range(config.recency_dim, config.recency_dim + config.n_spec))
    if config.query_entropy_feature:
        spectral.append(config.recency_dim + config.n_spec + int(config.key_norm_feature))
    return spectral


def step_features(
    step: MemoryStep,
    config: NAMMConfig,
    normaliser: FeatureNormaliser,
    ema: torch.Tensor | None = None,
    carry: torch.Tensor | None = None,
    update_stats: bool = False,
    attention: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Features of every slot of one layer at one memory step.

    Args:
        step: the memory step; needs ``attention`` ``(B, H, Q, T)`` and ``query_positions`` ``(Q,)``.
        config: the NAMM configuration.
        normaliser: statistics for the spectral part.
        ema: ``(B, H, T, n_spec)`` stored un-normalised EMA state (``None``: zeros, the first step).
        carry: ``(B, H, T, n_fft - hop)`` last attention values of the previous step (``None``: zeros).
        update_stats: merge the new EMA state of the valid slots into ``normaliser`` before normalising.
        attention: False when no scorer reads the attention features (:func:`attention_feature_indices`): they
            are then zeros, the step needs no attention weights and the EMA state and carry are not computed
            (returned as ``None``; the caller keeps no spectrogram state).

    With ``config.query_entropy_feature``, the per-token query entropy lives in ``step.state`` under
    :data:`QUERY_ENTROPY_KEY` (``(B, H, T, 1)``): the step's own tokens (its last ``Q`` slots) get the entropy of
    their query row divided by ``log(1 + slots they could see)``, older tokens keep theirs, and the state is
    written back to ``step.state`` here.

    Returns:
        ``features`` ``(B, H, T, config.feature_dim)`` float32 (zero for invalid slots),
        ``new_ema`` ``(B, H, T, n_spec)`` and ``new_carry`` ``(B, H, T, n_fft - hop)`` (zero for invalid slots).
    """
    if not attention:
        if update_stats:
            raise NammError("Collecting NAMM statistics needs the attention features (attention=True).")
        return _features(step, config, None, None), None, None
    if (step.attention is None and step.attention_stream is None) or step.query_positions is None:
        raise NammError("NAMM needs the attention of every query since the previous memory step (queries='all').")
    qpos, pos, valid = step.query_positions.to(step.positions.device), step.positions, step.valid
    b, h, t = pos.shape
    q = qpos.shape[0]
    att = step.attention
    if valid.shape != (b, h, t) or qpos.dim() != 1 or (att is not None and att.shape != (b, h, q, t)):
        raise NammError(
            f"Inconsistent memory step: attention {None if att is None else tuple(att.shape)}, positions "
            f"{tuple(pos.shape)}, valid {tuple(valid.shape)}, query_positions {tuple(qpos.shape)}."
        )
    n_carry = config.carry
    old_ema = _stored(ema, (b, h, t, config.n_spec), EMA_KEY, pos)
    old_carry = _stored(carry, (b, h, t, n_carry), CARRY_KEY, pos)
    pad = (-q) % config.hop

    entropy = pos.new_zeros((b, h, q), dtype=torch.float32) if config.query_entropy_feature and q else None
    if q == 0:
        new_ema, new_carry = old_ema, old_carry
    else:
        # Tokens born inside this step start from an empty state and carry, whatever the runtime stored.
        old = (pos < qpos[0]).unsqueeze(-1)
        if q == 1 or int(qpos[-1] - qpos[0]) == q - 1:  # consecutive query positions (always, from the cache)
            birth = (pos - qpos[0]).clamp(min=0, max=q)  # local query index; 0 for old tokens
        else:
            birth = torch.searchsorted(qpos.contiguous(), pos.contiguous())
        birth_frame = torch.div(birth + pad, config.hop, rounding_mode="floor")
        birth_frame = torch.where(old.squeeze(-1), torch.zeros_like(birth_frame), birth_frame)
        new_ema, new_carry = streamed_spectrogram_ema(
            step, old_ema.masked_fill(~old, 0.0), old_carry.masked_fill(~old, 0.0), birth_frame, pad, config,
            entropy_out=entropy,
        )

    keep = valid.unsqueeze(-1)
    new_ema = new_ema.masked_fill(~keep, 0.0)
    new_carry = new_carry.masked_fill(~keep, 0.0)
    if update_stats:
        normaliser.update(new_ema, valid)
    if config.spectral_norm == "per_head":
        spectral = standardise_per_head(torch.log(new_ema + LOG_FLOOR), valid)
    else:
        spectral = normaliser.normalise(new_ema)
    entropy_feature = standardise_per_head(_query_entropy_state(step, entropy), valid) if (
        config.query_entropy_feature) else None
    return _features(step, config, spectral, entropy_feature), new_ema, new_carry


def _features(
    step: MemoryStep, config: NAMMConfig, spectral: torch.Tensor | None, entropy: torch.Tensor | None
) -> torch.Tensor:
    """``(B, H, T, feature_dim)`` features from the attention features (``(B, H, T, n_spec)`` spectral part and
    ``(B, H, T, 1)`` query entropy; ``None``: zeros) and the ones read from the step itself."""
    pos, valid = step.positions, step.valid
    b, h, t = pos.shape
    keep = valid.unsqueeze(-1)
    newest = newest_position(pos, valid)
    age = torch.where(valid, newest - pos, 0).clamp(min=0) + config.recency_offset
    zeros = functools.partial(torch.zeros, b, h, t, dtype=torch.float32, device=pos.device)
    parts = [_recency_lookup(age, config.recency_dim, config.recency_max_freq),
             zeros(config.n_spec) if spectral is None else spectral]
    if config.key_norm_feature:
        norms = torch.log(step.keys.float().norm(dim=-1) + LOG_FLOOR)  # (B, H, T)
        parts.append(standardise_per_head(norms.unsqueeze(-1), valid))
    if config.query_entropy_feature:
        parts.append(zeros(1) if entropy is None else entropy)
    if config.key_novelty_feature:
        parts.append(standardise_per_head(key_novelty(step.keys, valid).unsqueeze(-1), valid))
    if config.reconstruction_feature:
        recon = step.state.get(RECONSTRUCTION_KEY)
        if recon is None or recon.shape != (b, h, t):
            raise NammError("reconstruction_feature needs the step's reconstruction attention in step.state "
                            f"[{RECONSTRUCTION_KEY!r}] as (B, H, T) (the NAMM policy writes it from the probe).")
        parts.append((torch.log(recon.float() + LOG_FLOOR) * valid).unsqueeze(-1))  # raw: compares across heads
    return torch.cat(parts, dim=-1).masked_fill(~keep, 0.0)


def _query_entropy_state(step: MemoryStep, entropy: torch.Tensor | None) -> torch.Tensor:
    """``(B, H, T, 1)`` per-token normalised query entropy after this step (see :func:`step_features`); stores it
    in ``step.state``. ``entropy``: ``(B, H, Q)`` raw row entropies of the step's ``Q`` queries, or ``None``."""
    pos, valid = step.positions, step.valid
    b, h, t = pos.shape
    state = _stored(step.state.get(QUERY_ENTROPY_KEY), (b, h, t, 1), QUERY_ENTROPY_KEY, pos).clone()
    if entropy is not None:
        q = entropy.shape[-1]
        seen = valid.cumsum(dim=-1)[:, :, t - q :].float()  # (B, H, Q) slots each query could see, itself included
        state[:, :, t - q :, 0] = entropy / torch.log1p(seen)
    state = state.masked_fill(~valid.unsqueeze(-1), 0.0)
    step.state[QUERY_ENTROPY_KEY] = state
    return state


def key_novelty(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, D)`` keys, ``(B, H, T)`` valid -> ``(B, H, T)`` one minus the cosine of each key with the mean
    of its head's valid keys (0 for invalid slots)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    w = valid.unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((keys.float() * w).sum(dim=2, keepdim=True), dim=-1)
    return ((1.0 - (unit * mean).sum(-1)) * valid).float()


#: Added before taking logs of magnitudes (the EMA of a token that received no attention is 0).
LOG_FLOOR = 1e-6


def standardise_per_head(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, F)`` -> each feature standardised over the valid slots of its head (zero mean, unit std).

    The statistics are this step's own, so the features do not drift with the context length; a head with
    a single valid slot (or a constant feature) gives zeros.
    """
    w = valid.unsqueeze(-1).float()
    n = w.sum(dim=2, keepdim=True).clamp(min=1.0)
    mean = (x * w).sum(dim=2, keepdim=True) / n
    var = (((x - mean) ** 2) * w).sum(dim=2, keepdim=True) / n
    return ((x - mean) / var.sqrt().clamp(min=1e-4)) * w


__all__ = [
    "CARRY_KEY",
    "EMA_KEY",
    "QUERY_ENTROPY_KEY",
    "RECONSTRUCTION_KEY",
    "FeatureNormaliser",
    "attention_feature_indices",
    "dft_basis",
    "hann_window",
    "key_novelty",
    "newest_position",
    "recency_code",
    "standardise_per_head",
    "step_features",
    "streamed_spectrogram_ema",
]
