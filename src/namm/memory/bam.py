"""The BAM scorer (spec section 3) as a stateless function of a flat parameter vector.

For every (batch row, KV head), on that head's valid cached tokens with features ``z`` (25 dims):

1. ``[q, k, v] = z @ W_qkv + b_qkv`` (25 -> 3 x 32, one head of dim 32, no RoPE),
2. backward attention: token ``i`` attends to every valid token ``j`` with ``position_j >= position_i``
   (itself and all newer tokens), softmax of ``q_i . k_j / sqrt(32)``,
3. ``[r, m] = attn @ W_out + b_out`` (32 -> 2 x 25), ``h = z * (1 + m) + r``,
4. ``score = h @ w_head + b_head`` (25 -> 1).

Shortcuts, exact up to float rounding: when the value part of ``W_qkv`` is zero (e.g. a search that only
moves the linear head), every value is ``b_v`` and so is every softmax average of them, so the attention is
not computed; when ``W_out`` is zero, ``[r, m] = b_out`` whatever the attention. Option (``bam_window``, off
by default, a deviation from the reference): each token attends only to itself and its ``bam_window - 1``
next newer tokens, ``O(T window)`` instead of ``O(T^2)``.

Flat layout (4,172 values for the default config): ``[qkv weight (in x out, row-major), qkv bias,
out weight (in x out), out bias, head weight (in x out), head bias, depth logits]``; the biases are absent
when ``bam_bias`` is false, and the ``depth_knots`` depth logits (the budgeted mode's allocation over
layers, not part of the scorer) are absent when it is 0. A ``(B, n)`` parameter matrix gives every batch
row its own vector (population mode); all products are broadcast batched matmuls.
"""

from __future__ import annotations

import math

import torch

from namm.errors import NammError
from namm.memory.config import NAMMConfig


def param_shapes(config: NAMMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape), ...]`` in flat-vector order."""
    d, hd = config.feature_dim, config.bam_heads * config.bam_hidden
    shapes = [
        ("qkv_weight", (d, 3 * hd)),
        ("qkv_bias", (3 * hd,)),
        ("out_weight", (hd, 2 * d)),
        ("out_bias", (2 * d,)),
        ("head_weight", (d, 1)),
        ("head_bias", (1,)),
        ("depth_logits", (config.depth_knots,)),
    ]
    return [(n, s) for n, s in shapes if (config.bam_bias or not n.endswith("_bias")) and math.prod(s) > 0]


def param_count(config: NAMMConfig | None = None) -> int:
    """Length of the flat parameter vector (4,172 for the default config)."""
    return sum(math.prod(s) for _, s in param_shapes(config or NAMMConfig()))


def unflatten(params: torch.Tensor, config: NAMMConfig | None = None) -> dict[str, torch.Tensor]:
    """Named views of a flat vector ``(..., n)``: each entry has shape ``(..., *shape)``."""
    config = config or NAMMConfig()
    n = param_count(config)
    if params.shape[-1:] != (n,):
        raise NammError(f"NAMM parameters must have {n} values in their last dimension, got {tuple(params.shape)}.")
    lead = params.shape[:-1]
    out, offset = {}, 0
    for name, shape in param_shapes(config):
        size = math.prod(shape)
        out[name] = params[..., offset : offset + size].reshape(*lead, *shape)
        offset += size
    return out


def flatten(named: dict[str, torch.Tensor], config: NAMMConfig | None = None) -> torch.Tensor:
    """Inverse of :func:`unflatten`: ``{name: (..., *shape)}`` -> ``(..., n)``."""
    config = config or NAMMConfig()
    parts = []
    for name, shape in param_shapes(config):
        if name not in named:
            raise NammError(f"Missing NAMM parameter {name!r}.")
        t = named[name]
        if tuple(t.shape[t.dim() - len(shape) :]) != shape:
            raise NammError(f"NAMM parameter {name!r} must end with shape {shape}, got {tuple(t.shape)}.")
        parts.append(t.reshape(*t.shape[: t.dim() - len(shape)], -1))
    return torch.cat(parts, dim=-1)


def _sort_newest_first(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gather index ``(B, H, nh, T, hd)`` and ``q, k, v`` reordered: newest valid slot first, invalid slots last."""
    b, h, nh, t, hd = q.shape
    order = torch.where(valid, -positions, torch.iinfo(positions.dtype).max).argsort(dim=-1, stable=True)
    idx = order[:, :, None, :, None].expand(b, h, nh, t, hd)
    return idx, [x.gather(3, idx).reshape(b * h, nh, t, hd) for x in (q, k, v)]


def _backward_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    window: int = 0,
) -> torch.Tensor:
    """Backward-masked softmax attention: every valid slot attends to itself and the newer valid slots.

    The slots of every head are put newest first with invalid slots last; "``j`` is ``i`` or newer" then
    becomes "``j`` comes no later than ``i``", a causal mask, and the invalid keys come after every valid
    query, so causality hides them too. One fused SDPA call, no ``T x T`` mask in memory.

    With ``window > 0`` (an option, not the reference) a slot attends only to itself and the ``window - 1``
    valid slots just newer than it: a sliding causal window in the sorted order, computed in chunks of
    ``window`` queries that see their own chunk and the previous one, so the cost is ``O(T window)``.

    Args:
        q, k, v: ``(B, H, nh, T, hd)`` float32.
        positions: ``(B, H, T)`` order of the slots (larger = newer).
        valid: ``(B, H, T)`` bool; invalid slots are never attended to by valid slots.
        window: 0 (every newer slot) or the number of slots each slot attends to, itself included.

    Returns:
        ``(B, H, nh, T, hd)``, in the original slot order. Every slot attends at least to itself.
    """
    b, h, nh, t, hd = q.shape
    if t == 0:
        return q.clone()
    idx, (qs, ks, vs) = _sort_newest_first(q, k, v, positions, valid)
    if window <= 0 or window >= t:
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    else:
        out = _windowed_causal_attention(qs, ks, vs, window)
    return torch.empty_like(q).scatter_(3, idx, out.reshape(b, h, nh, t, hd))


def _windowed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """``(N, nh, T, hd)`` causal attention where query ``i`` sees keys ``i - window + 1 .. i`` only.

    Chunks of ``window`` queries attend to their own chunk and the previous one (``2 window`` keys) under a
    banded mask; keys before the sequence (the first chunk's previous chunk) are masked.
    """
    n, nh, t, hd = q.shape
    w = window
    chunks = -(-t // w)
    pad = chunks * w - t
    if pad:  # padding at the end: later than every real query, so causality hides it
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qc = q.view(n, nh, chunks, w, hd)
    kc, vc = (
        torch.cat([torch.nn.functional.pad(x, (0, 0, w, 0))[:, :, : chunks * w].view(n, nh, chunks, w, hd),
                   x.view(n, nh, chunks, w, hd)], dim=3)
        for x in (k, v)
    )  # (N, nh, chunks, 2w, hd): previous chunk, then own chunk
    i = torch.arange(w, device=q.device)[:, None]
    m = torch.arange(2 * w, device=q.device)[None, :]
    band = (m > i) & (m <= i + w)  # key m of [previous, own] is query i's key (i - w, i]
    mask = band.expand(chunks, w, 2 * w).clone()
    mask[0, :, :w] = False  # the first chunk has no previous chunk
    out = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask)
    return out.reshape(n, nh, chunks * w, hd)[:, :, :t]


def bam_scores(
    features: torch.Tensor,
    valid: torch.Tensor,
    params: torch.Tensor,
    config: NAMMConfig | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every cached token (the attention is skipped when zero weights make it irrelevant, see above).

    Args:
        features: ``(B, H, T, d)`` token features (``d = config.feature_dim``, 25 by default).
        valid: ``(B, H, T)`` bool; invalid slots are excluded as keys and get score ``-inf``.
        params: ``(n,)`` one vector for every row, or ``(B, n)`` row ``b`` uses ``params[b]``.
        config: the NAMM configuration (default config if omitted).
        positions: ``(B, H, T)`` token positions defining "newer"; default: the slot index.

    Returns:
        ``(B, H, T)`` float32 scores (``-inf`` for invalid slots).
    """
    return _bam_scores(features, valid, params, config, positions, shortcuts=True)


def _bam_scores(
    features: torch.Tensor,
    valid: torch.Tensor,
    params: torch.Tensor,
    config: NAMMConfig | None,
    positions: torch.Tensor | None,
    shortcuts: bool,
) -> torch.Tensor:
    """:func:`bam_scores`, with the shortcuts on or off."""
    config = config or NAMMConfig()
    b, h, t, d = features.shape
    if d != config.feature_dim:
        raise NammError(f"BAM expects {config.feature_dim} features per token, got {d}.")
    if valid.shape != (b, h, t):
        raise NammError(f"valid has shape {tuple(valid.shape)}, expected {(b, h, t)}.")
    if params.dim() == 1:
        params = params.unsqueeze(0)
    elif params.dim() != 2 or params.shape[0] != b:
        raise NammError(
            f"NAMM parameters must be a vector or one row per batch row ({b}), got shape {tuple(params.shape)}."
        )
    if positions is None:
        positions = torch.arange(t, device=features.device).expand(b, h, t)
    w = unflatten(params.to(device=features.device, dtype=torch.float32), config)
    rows = params.shape[0]
    nh, hd = config.bam_heads, config.bam_hidden

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        weight = w[f"{name}_weight"]  # (rows, in, out)
        y = x @ weight.view(rows, 1, *weight.shape[1:])
        bias = w.get(f"{name}_bias")
        return y if bias is None else y + bias.view(rows, 1, 1, -1)

    z = features.float()
    if shortcuts and not bool(w["out_weight"].any()):  # the attention cannot reach [r, m] = b_out
        out_bias = w.get("out_bias")
        rm = z.new_zeros(rows, 1, 1, 2 * d) if out_bias is None else out_bias.view(rows, 1, 1, 2 * d)
        r, m = rm.expand(b, h, t, 2 * d).split(d, dim=-1)
    else:
        if shortcuts and not bool(w["qkv_weight"][..., 2 * nh * hd :].any()):
            # Zero value weights: every value is the value bias, so is every softmax average of them.
            bias = w.get("qkv_bias")
            v_bias = z.new_zeros(rows, nh * hd) if bias is None else bias[:, 2 * nh * hd :]
            attn = v_bias.view(rows, 1, 1, nh * hd).expand(b, h, t, nh * hd)
        else:
            qkv = linear(z, "qkv").view(b, h, t, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)  # (3, B, H, nh, T, hd)
            attn = _backward_attention(qkv[0], qkv[1], qkv[2], positions, valid, config.bam_window)
            attn = attn.transpose(2, 3).reshape(b, h, t, nh * hd)
        r, m = linear(attn, "out").split(d, dim=-1)
    score = linear(z * (1.0 + m) + r, "head").squeeze(-1)
    return score.masked_fill(~valid, float("-inf"))


__all__ = ["bam_scores", "flatten", "param_count", "param_shapes", "unflatten"]
