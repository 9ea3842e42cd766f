"""Turning scores into keep masks. Shared by every policy."""

from __future__ import annotations

import torch


def top_k_keep(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[b]`` highest-scored valid slots of every head of row ``b``.

    Args:
        scores: ``(B, H, T)`` float scores.
        valid: ``(B, H, T)`` bool; invalid slots are never kept.
        k: ``(B,)`` int64 tokens to keep per head.

    Returns:
        ``(B, H, T)`` bool keep mask with ``min(k[b], #valid)`` slots set per head.
    """
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return valid & (rank < k.view(-1, 1, 1))


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
