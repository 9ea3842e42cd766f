"""The classic KV-cache eviction policies, each one scoring method (higher score = keep).

All of them keep, per KV head, their ``budget`` best tokens at every memory step (see
:class:`~namm.policies.base.BudgetPolicy`); protected tokens (sinks, recent windows) are lifted above
every other score, as kvpress does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from namm.errors import NammError
from namm.policies.base import (
    ALL_QUERIES,
    BudgetPolicy,
    MemoryStep,
    Policy,
    StepRequest,
    protect,
    read_attention,
    recent_mask,
    sink_mask,
)


@dataclass
class Full(Policy):
    """Keep every token (the reference full cache)."""

    name = "full"
    request = StepRequest(evicts=False)


@dataclass
class StreamingLLM(BudgetPolicy):
    """Attention sinks plus a recent window (Xiao et al., 2023, arXiv 2309.17453).

    Args:
        budget: tokens (or fraction of tokens seen) kept per head.
        sinks: number of first real tokens always kept.
    """

    name = "streaming"
    sinks: int = 4

    def score(self, step: MemoryStep) -> torch.Tensor:
        return protect(step.positions.float(), sink_mask(step, self.sinks))


@dataclass
class H2O(BudgetPolicy):
    """Heavy hitters: accumulated attention received, plus a recent window (Zhang et al., 2023, arXiv 2306.14048).

    Args:
        budget: tokens (or fraction) kept per head.
        recent_ratio: share of the budget reserved for the most recent tokens.
    """

    name = "h2o"
    request = StepRequest(queries=ALL_QUERIES, stream=True)
    recent_ratio: float = 0.5
    #: Queries per block of recomputed attention (the attention is summed block by block, never stored whole).
    block: ClassVar[int] = 128

    def score(self, step: MemoryStep) -> torch.Tensor:
        acc = step.state.get("h2o_acc")
        acc = torch.zeros_like(step.positions, dtype=torch.float32) if acc is None else acc.clone()
        q = step.query_positions.shape[0] if step.query_positions is not None else 0
        if q:
            for att in read_attention(step, [*range(0, q, self.block), q]):  # (B, H, L, V)
                acc[..., : att.shape[-1]] += att.sum(dim=2)
        step.state["h2o_acc"] = acc
        recent = int(self.budget_tokens(step).max().item() * self.recent_ratio)
        return protect(acc, recent_mask(step, recent))


@dataclass
class L2Norm(BudgetPolicy):
    """Keep the tokens whose keys have the lowest L2 norm (Devoto et al., 2024, arXiv 2406.11430)."""

    name = "l2"

    def score(self, step: MemoryStep) -> torch.Tensor:
        return -step.keys.float().norm(dim=-1)


@dataclass
class SnapKV(BudgetPolicy):
    """Attention from an observation window of recent queries, pooled (Li et al., 2024, arXiv 2404.14469).

    Run question-agnostically at every memory step: the window is the last ``window`` queries.

    Args:
        budget: tokens (or fraction) kept per head.
        window: observation window (recent queries; their own tokens are always kept).
        kernel: average-pooling kernel along the cache axis, over a head's valid slots in order: where a head has
            padding slots (heads keeping different numbers of tokens, left padding), they are taken out before the
            pooling and a slot's neighbours are the kept tokens next to it, wherever the store put the padding.
    """

    name = "snapkv"
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise NammError(
                f"SnapKV: window must be >= 1 and kernel an odd number >= 1 (got {self.window}, {self.kernel})."
            )

    @property
    def request(self) -> StepRequest:  # type: ignore[override]
        """The attention of the last ``window`` queries."""
        return StepRequest(queries=self.window)

    def score(self, step: MemoryStep) -> torch.Tensor:
        b, h, _, t = step.attention.shape
        attn = step.attention.mean(dim=2)  # (B, H, T); zero on invalid slots

        def pool(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(b * h, 1, t)
            return torch.nn.functional.avg_pool1d(x, self.kernel, stride=1, padding=self.kernel // 2).view(b, h, t)

        if bool(step.valid.all()):
            pooled = pool(attn)
        else:  # pool the valid slots packed in order (padding moved behind them), then put them back
            order = (~step.valid).to(torch.uint8).argsort(dim=-1, stable=True)
            packed = (attn * step.valid).gather(2, order)
            pooled = torch.zeros_like(attn).scatter_(2, order, pool(packed))
        return protect(pooled, recent_mask(step, self.window))


@dataclass
class Random(BudgetPolicy):
    """Keep a random subset (seeded: the same seed, layer and step give the same choice)."""

    name = "random"
    seed: int = 0

    def score(self, step: MemoryStep) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step.layer_idx * 10_007 + step.n_seen)
        return torch.rand(step.positions.shape, generator=gen).to(step.positions.device)
