"""Where the budget goes over depth: per-layer cache shares as a smooth function of relative depth.

A :class:`DepthAllocation` holds ``K`` logits at evenly spaced knots of *relative* depth (0 = the first
managed layer, 1 = the last), linearly interpolated to every managed layer, so one allocation transfers
to a model with another number of layers (SmolLM2's 30, Gemma 3's 3 global layers). The shares are a
softmax over layers scaled so that the layers' mean fraction equals the requested mean budget exactly;
a layer never gets more than its whole cache, and what it cannot use is redistributed to the others
in proportion to their shares (water-filling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from namm.errors import NammError


def relative_depths(n_layers: int) -> torch.Tensor:
    """``(L,)`` float64 relative depth of each managed layer, ``i / (L - 1)`` (0 for a single layer)."""
    if n_layers < 1:
        raise NammError(f"A depth allocation needs at least one layer, got {n_layers}.")
    if n_layers == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(n_layers, dtype=torch.float64) / (n_layers - 1)


def layer_logits(knots: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Interpolate ``(..., K)`` knot logits (knots at ``linspace(0, 1, K)``) to ``(..., L)`` layer logits."""
    k = knots.shape[-1]
    if k == 1:
        return knots.double().expand(*knots.shape[:-1], n_layers)
    x = relative_depths(n_layers) * (k - 1)  # position in knot units
    lo = x.floor().long().clamp(max=k - 2)
    frac = (x - lo).to(torch.float64)
    kd = knots.double()
    return kd[..., lo] * (1 - frac) + kd[..., lo + 1] * frac


def allocate(knots: torch.Tensor, mean_fraction: torch.Tensor | float, n_layers: int) -> torch.Tensor:
    """Per-layer cache fractions whose mean over layers is ``mean_fraction``.

    Args:
        knots: ``(K,)`` or ``(B, K)`` logits at evenly spaced relative depths.
        mean_fraction: scalar or ``(B,)`` mean fraction of each layer's cache to keep, in ``(0, 1]``
            (knots and means broadcast to a common ``B``).
        n_layers: number of managed layers ``L``.

    Returns:
        ``(B, L)`` float64 fractions in ``(0, 1]`` with ``fractions.mean(-1) == mean_fraction`` (up to
        float rounding): softmax shares times ``L * mean_fraction``, capped at 1 with the excess
        redistributed over the uncapped layers in proportion to their shares.
    """
    knots = torch.as_tensor(knots, dtype=torch.float64)
    if knots.dim() == 1:
        knots = knots[None]
    m = torch.as_tensor(mean_fraction, dtype=torch.float64).reshape(-1)
    b = max(knots.shape[0], m.shape[0])
    knots, m = knots.expand(b, -1), m.expand(b).clone()
    if bool(((m <= 0) | (m > 1)).any()):
        raise NammError(f"A mean budget fraction must lie in (0, 1], got {m.tolist()}.")
    share = torch.softmax(layer_logits(knots, n_layers), dim=-1)  # (B, L), sums to 1
    total = m * n_layers  # (B,) sum of fractions to hand out
    capped = torch.zeros(b, n_layers, dtype=torch.bool)
    frac = torch.zeros(b, n_layers, dtype=torch.float64)
    for _ in range(n_layers):
        free = total - capped.sum(-1)  # what the uncapped layers share
        weight = share.masked_fill(capped, 0.0)
        frac = torch.where(capped, torch.ones_like(frac), weight * (free / weight.sum(-1).clamp(min=1e-300))[:, None])
        over = (frac > 1.0) & ~capped
        if not bool(over.any()):
            break
        capped |= over
    return frac.clamp(max=1.0)


@dataclass(frozen=True)
class DepthAllocation:
    """A fixed depth allocation, for any :class:`~namm.policies.base.BudgetPolicy` (``allocation=``).

    Args:
        knots: logits at ``K`` evenly spaced relative depths (``(0.0,)`` or all equal: uniform).
    """

    knots: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.knots:
            raise NammError("DepthAllocation needs at least one knot.")
        object.__setattr__(self, "knots", tuple(float(k) for k in self.knots))

    @classmethod
    def from_sequence(cls, values: Sequence[float]) -> DepthAllocation:
        return cls(tuple(values))

    def fractions(self, mean_fraction: float, n_layers: int) -> torch.Tensor:
        """``(L,)`` fractions with mean ``mean_fraction``."""
        return allocate(torch.tensor(self.knots), mean_fraction, n_layers)[0]

    def __str__(self) -> str:
        return "depth[" + ",".join(f"{k:.2f}" for k in self.knots) + "]"


__all__ = ["DepthAllocation", "allocate", "layer_logits", "relative_depths"]
