"""One memory step of one layer: the :class:`~namm.policies.base.MemoryStep` a policy sees, and eviction.

:class:`namm.cache.MemoryCache` decides when a step is due and calls :func:`run_step`, which

1. builds the step from the layer's store (:class:`namm.store.EvictingLayer`) and what the policy's
   :class:`~namm.policies.base.StepRequest` asks for: the attention of the kept recent queries, recomputed
   against the current slots (:func:`recompute_attention`, whole or as a stream of query blocks) or, where
   the attention call just computed it for exactly those queries, sliced from it (:func:`given_attention`);
   a probe;
2. asks the policy for scores and a keep mask (``policy.score``, ``policy.keep``);
3. compacts the store to the kept slots and returns a :class:`StepRecord` for the cache's statistics.

Nothing here keeps state: the cache owns the cadence, the statistics and the byte accounting.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from namm.policies.base import MemoryStep, Policy, Probe

if TYPE_CHECKING:
    from namm.store import EvictingLayer

ATTENTION_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32 logits per block of queries at a memory step


@dataclass
class StepRecord:
    """What one memory step of one layer did. ``kept`` / ``before``: ``(B, H)`` tokens per row and head after
    and before the step."""

    layer_idx: int
    n_seen: int
    kept: torch.Tensor
    before: torch.Tensor
    seconds: float


@dataclass
class CacheStats:
    """Running statistics of a :class:`namm.cache.MemoryCache`."""

    steps: list[StepRecord] = field(default_factory=list)
    peak_bytes: int = 0
    memory_seconds: float = 0.0


@dataclass(frozen=True)
class LayerContext:
    """What a step needs to know about its layer beyond the store: the model's shape and the attention's scale.

    Attributes:
        num_layers: decoder layers in the model.
        managed: indices of the layers the cache manages.
        scaling: the layer's softmax scale.
        softcap: the layer's attention logit soft-cap, or ``None``.
    """

    num_layers: int
    managed: tuple[int, ...]
    scaling: float
    softcap: float | None = None


def _causal(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def recompute_attention(
    layer: EvictingLayer, scaling: float, softcap: float | None, bounds: list[int],
    keys: torch.Tensor | None = None, valid: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Recompute, block by block, the softmax attention of the layer's kept queries against its current slots.

    The kept queries belong to the last ``Q`` slots (appended since the previous memory step), so the mask is
    the slots' validity plus causality over those last ``Q`` slots. Only one block of logits exists at a time,
    so a policy that folds the attention into a running summary (NAMM's spectrogram) never materialises the
    ``(Q, T)`` matrix.

    Args:
        layer: the store, with ``queries`` ``(B, H_q, Q, D)``.
        scaling, softcap: the layer's softmax scale and logit soft-cap (``None``: none).
        bounds: increasing query indices ``0 = b_0 < b_1 < ... = Q``.
        keys, valid: the layer's ``(B, H, T, D)`` keys and ``(B, H, T)`` validity, where the caller holds them
            already (a ragged layer's are stacked copies; ``None``: read them from the layer).

    Yields:
        for each range ``b_i:b_(i+1)`` (``L`` queries), a ``(B, H, L, V)`` float32 tensor: the attention
        those queries gave the first ``V = T - Q + b_(i+1)`` slots, averaged over the query heads of each
        KV head (rows of padding queries are zero). Later slots are in the queries' future: zero.
    """
    keys = layer.keys if keys is None else keys
    b, hq, nq, d = layer.queries.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    queries = layer.queries.view(b, h, g, nq, d)
    keys_t = keys.float().transpose(-1, -2).contiguous()  # (B, H, D, T): one copy, sliced per block
    # (B, H, 1, 1, T), or None when every slot is valid: a layer compacted to equal per-head budgets (every classic
    # policy, a NAMM without head sharing) has no padding slots, and the fill would be a pass over every logit.
    if not layer.dense:
        valid = layer.valid if valid is None else valid
    hidden = None if layer.dense or bool(valid.all()) else ~valid[:, :, None, None, :]
    causal = _causal(nq, layer.device)
    real = layer.real[:, layer.n_seen - nq :] if layer.padded else None
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        n, vis, cut = hi - lo, t - nq + hi, t - nq + lo
        block = (queries[:, :, :, lo:hi].float() * scaling).reshape(b, h, g * n, d)
        logits = torch.matmul(block, keys_t[..., :vis]).view(b, h, g, n, vis)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if hidden is not None:
            logits.masked_fill_(hidden[..., :vis], float("-inf"))
        logits[..., cut:].masked_fill_(~causal[lo:hi, lo:hi], float("-inf"))
        att = torch.softmax(logits, dim=-1).mean(dim=2)
        if real is not None:
            att *= real[:, None, lo:hi, None]
            att.nan_to_num_(0.0)
        yield att


def given_attention(weights: torch.Tensor, bounds: list[int]) -> Iterator[torch.Tensor]:
    """:func:`recompute_attention`'s blocks, sliced from weights the attention call already computed.

    Args:
        weights: ``(B, H, Q, T)`` float32, the kept queries' attention over the current slots, averaged over
            each KV head's query heads (:func:`namm.attention.explicit_attention`).
        bounds: increasing query indices ``0 = b_0 < b_1 < ... = Q``.

    Yields:
        ``(B, H, L, V)`` views, ``V = T - Q + b_(i+1)`` as there.
    """
    nq, t = weights.shape[2], weights.shape[3]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        yield weights[:, :, lo:hi, : t - nq + hi]


def whole_attention(
    layer: EvictingLayer, scaling: float, softcap: float | None,
    keys: torch.Tensor | None = None, valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, H, Q, T)`` float32: :func:`recompute_attention` for every kept query at once (padding rows zero)."""
    b, hq, nq, _ = layer.queries.shape
    _, h, t = layer.slot_shape()
    out = torch.zeros(b, h, nq, t, dtype=torch.float32, device=layer.device)
    per_block = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, b * hq * t))  # bounds the transient logits
    bounds = [*range(0, nq, per_block), nq]
    blocks = recompute_attention(layer, scaling, softcap, bounds, keys, valid)
    for lo, att in zip(bounds, blocks, strict=False):
        out[:, :, lo : lo + att.shape[2], : att.shape[3]] = att
    return out


def step_view(
    layer: EvictingLayer, context: LayerContext, probe: Probe | None = None,
    keys: torch.Tensor | None = None, valid: torch.Tensor | None = None, **attention,
) -> MemoryStep:
    """The :class:`MemoryStep` a policy sees for ``layer`` now; ``attention`` may give ``attention``,
    ``query_positions`` and ``attention_stream`` (none by default); ``keys`` and ``valid`` as
    :func:`recompute_attention` takes them."""
    return MemoryStep(
        layer_idx=layer.layer_idx,
        num_layers=context.num_layers,
        keys=layer.keys if keys is None else keys,
        values=layer.values,
        positions=layer.positions,
        valid=layer.valid if valid is None else valid,
        attention=attention.get("attention"),
        query_positions=attention.get("query_positions"),
        attention_stream=attention.get("attention_stream"),
        n_seen=layer.n_seen,
        n_real=layer.real.sum(dim=-1),
        state=layer.state,
        managed_layers=context.managed,
        probe=probe,
    )


def run_step(
    layer: EvictingLayer,
    policy: Policy,
    context: LayerContext,
    probe: Probe | None = None,
    weights: torch.Tensor | None = None,
) -> StepRecord:
    """Score, select and evict in one layer; then forget its kept queries. Returns what the step did.

    ``weights``: ``(B, H, Q, T)`` float32, the kept queries' attention as the attention call that just ran
    computed it (see :func:`given_attention`); the step then serves the policy from it instead of recomputing.
    """
    start = time.perf_counter()
    request = policy.request
    keys, valid = layer.keys, layer.valid  # a ragged layer's are stacked copies: made once per step
    attention = {}
    if request.attention and layer.queries is not None:
        attention["query_positions"] = layer.query_positions()
        if weights is not None:
            if request.stream:
                attention["attention_stream"] = functools.partial(given_attention, weights)
            else:
                attention["attention"] = weights
        elif request.stream:
            attention["attention_stream"] = functools.partial(
                recompute_attention, layer, context.scaling, context.softcap, keys=keys, valid=valid
            )
        else:
            attention["attention"] = whole_attention(layer, context.scaling, context.softcap, keys, valid)
    step = step_view(layer, context, probe, keys, valid, **attention)
    scores = policy.score(step)
    keep = policy.keep(step, scores) & valid
    layer.state = step.state
    before = valid.sum(dim=-1)
    if not bool((keep == valid).all()) or not bool(valid.all()):
        layer.compact(keep)
    layer.mark_stepped()
    return StepRecord(layer.layer_idx, layer.n_seen, keep.sum(dim=-1).cpu(), before.cpu(), time.perf_counter() - start)
