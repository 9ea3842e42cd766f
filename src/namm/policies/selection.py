"""Turning scores into keep masks. Shared by every policy."""

from __future__ import annotations

import torch


def top_k_keep(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[b]`` (or ``k[b, h]``) highest-scored valid slots of every head of row ``b``.

    Args:
        scores: ``(B, H, T)`` float scores.
        valid: ``(B, H, T)`` bool; invalid slots are never kept.
        k: ``(B,)`` int64 tokens to keep per head, or ``(B, H)`` per head (a per-head allocation).

    Returns:
        ``(B, H, T)`` bool keep mask with ``min(k, #valid)`` slots set per head.
    """
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return valid & (rank < (k[:, :, None] if k.dim() == 2 else k.view(-1, 1, 1)))


def threshold_keep(
    scores: torch.Tensor, valid: torch.Tensor, per_layer: bool, always: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep tokens with a non-negative score.

    Args:
        scores: ``(B, H, T)`` float scores; a score of exactly 0 is kept.
        valid: ``(B, H, T)`` bool; invalid slots are never kept.
        per_layer: if True, the reference rule: every head of the layer keeps as many tokens as the head
            with the most non-negative scores, taking its highest-scored ones. The count is taken per batch
            row (the reference only ran one row), so rows never influence each other's caches. If False,
            each head keeps exactly its own non-negative tokens.
        always: optional ``(B, H, T)`` bool mask of slots that are kept regardless of score.

    Returns:
        ``(B, H, T)`` bool keep mask.
    """
    s = scores.float()
    if always is not None:
        s = s.masked_fill(always & valid, float("inf"))
    keep = valid & (s >= 0)
    if not per_layer:
        return keep
    return top_k_keep(s, valid, keep.sum(dim=-1).amax(dim=-1))


def layer_total(k: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B,)`` tokens a layer of ``heads`` KV heads keeps in all: ``k x heads`` for ``(B,)`` per-head counts, the
    sum of ``(B, H)`` per-head counts."""
    return k.sum(-1) if k.dim() == 2 else k * heads


def head_cap_tokens(k: torch.Tensor, cap: float) -> torch.Tensor:
    """``(B,)`` or ``(B, H)`` most tokens a head may keep under a shared budget: ``ceil(cap x k)``."""
    return torch.ceil(k.double() * cap).long()


def head_adaptive_keep(
    scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, safeguard: float = 0.0, cap: float = 0.0
) -> torch.Tensor:
    """Keep ``k[b] * H`` slots in each row ``b`` of a layer, the highest-scored over all its heads together (AdaKV).

    Heads with peaked scores give budget to heads with flat ones; with ``safeguard > 0`` every head first keeps
    its ``floor(safeguard * k[b])`` best slots (AdaKV's ``alpha_safeguard``). The layer's total is exact: a head
    never keeps more than its valid slots, and the row keeps ``min(k[b] * H, #valid)`` slots.

    Args:
        scores: ``(B, H, T)`` float scores, comparable across the heads of a layer.
        valid: ``(B, H, T)`` bool; invalid slots are never kept.
        k: ``(B,)`` int64 mean tokens per head, or ``(B, H)`` per-head shares (the layer keeps their sum).
        safeguard: share of ``k`` every head keeps regardless of the other heads, in ``[0, 1]``.
        cap: 0, or ``>= 1``: no head keeps more than ``ceil(cap x k)`` slots (its best ones compete for the layer's
            total), which limits how unevenly the layer spends its budget; the total stays exact.

    Returns:
        ``(B, H, T)`` bool keep mask.
    """
    b, h, t = scores.shape
    s = scores.float()
    if cap:
        valid = valid & top_k_keep(s, valid, head_cap_tokens(k, cap))
    if safeguard > 0:
        guaranteed = top_k_keep(s, valid, torch.floor(k.double() * safeguard).long())
        s = s.masked_fill(guaranteed, float("inf"))
    flat = top_k_keep(s.reshape(b, 1, h * t), valid.reshape(b, 1, h * t), layer_total(k, h))
    return flat.view(b, h, t)


def layer_shared_keep(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, per_head: bool) -> torch.Tensor:
    """The keep rule of KVzip-style policies: ``per_head`` keeps each head's ``k`` best slots (:func:`top_k_keep`),
    otherwise a layer keeps ``k x H`` slots, its best over all heads (:func:`head_adaptive_keep`)."""
    return top_k_keep(scores, valid, k) if per_head else head_adaptive_keep(scores, valid, k)
