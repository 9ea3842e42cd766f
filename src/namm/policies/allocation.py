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


def _check_means(m: torch.Tensor) -> None:
    if bool(((m <= 0) | (m > 1)).any()):
        raise NammError(f"A mean budget fraction must lie in (0, 1], got {m.tolist()}.")


def water_fill(logits: torch.Tensor, mean_fraction: torch.Tensor) -> torch.Tensor:
    """Fractions of ``N`` units (layers, or heads) whose mean is ``mean_fraction``, shared by softmax of ``logits``.

    Args:
        logits: ``(B, N)`` float64 logits.
        mean_fraction: ``(B,)`` float64 means in ``(0, 1]``.

    Returns:
        ``(B, N)`` float64 fractions in ``[0, 1]`` summing to ``N x mean_fraction``: softmax shares times
        ``N x mean_fraction``, capped at 1 with the excess redistributed over the uncapped units in proportion
        to their shares.
    """
    b, n = logits.shape
    share = torch.softmax(logits, dim=-1)  # (B, N), sums to 1
    total = mean_fraction * n  # (B,) sum of fractions to hand out
    capped = torch.zeros(b, n, dtype=torch.bool)
    frac = torch.zeros(b, n, dtype=torch.float64)
    for _ in range(n):
        free = total - capped.sum(-1)  # what the uncapped units share
        weight = share.masked_fill(capped, 0.0)
        frac = torch.where(capped, torch.ones_like(frac), weight * (free / weight.sum(-1).clamp(min=1e-300))[:, None])
        over = (frac > 1.0) & ~capped
        if not bool(over.any()):
            break
        capped |= over
    return frac.clamp(max=1.0)


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
    _check_means(m)
    return water_fill(layer_logits(knots, n_layers), m)


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


def allocate_heads(logits: torch.Tensor, mean_fraction: torch.Tensor | float, floor: float = 0.0) -> torch.Tensor:
    """Per-head cache fractions over a whole model whose mean over every (layer, head) is ``mean_fraction``.

    Every head first gets ``f = min(floor, mean)``; the rest of the budget is water-filled over the heads by
    the softmax of their logits (:func:`water_fill`), so ``fractions = f + (1 - f) x water_fill(logits, (mean -
    f) / (1 - f))``: exact mean, every head in ``[f, 1]``.

    Args:
        logits: ``(L, H)`` logits, one per managed layer and KV head.
        mean_fraction: scalar or ``(B,)`` mean fraction in ``(0, 1]``.
        floor: the least fraction any head keeps, in ``[0, 1)``.

    Returns:
        ``(B, L, H)`` float64 fractions.
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.dim() != 2:
        raise NammError(f"Head allocation logits must be (layers, heads), got shape {tuple(logits.shape)}.")
    m = torch.as_tensor(mean_fraction, dtype=torch.float64).reshape(-1)
    _check_means(m)
    if not 0.0 <= floor < 1.0:
        raise NammError(f"A head allocation's floor must lie in [0, 1), got {floor}.")
    f = m.clamp(max=floor)  # (B,)
    rest = ((m - f) / (1 - f)).clamp(min=1e-12)
    flat = water_fill(logits.reshape(1, -1).expand(m.shape[0], -1), rest)  # (B, L*H)
    return (f[:, None] + (1 - f[:, None]) * flat).view(m.shape[0], *logits.shape)


@dataclass(frozen=True)
class HeadAllocation:
    """A per-head allocation for one model: a logit per (managed layer, KV head), for any budgeted policy
    (``allocation=``) and the NAMM (``head_logits``).

    The budget is the mean over every head of the model; heads with high logits keep up to their whole cache
    (DuoAttention's retrieval heads), the others down to ``floor``. Unlike :class:`DepthAllocation` it is tied
    to the model's shape (layers x KV heads); it is fitted from attention on full-cache runs
    (``benchmarks/retrieval_heads.py``, :func:`fit_head_logits`).

    Args:
        logits: ``L`` rows of ``H`` logits.
        floor: the least fraction of its tokens any head keeps.
    """

    logits: tuple[tuple[float, ...], ...]
    floor: float = 0.0

    def __post_init__(self) -> None:
        rows = tuple(tuple(float(v) for v in row) for row in self.logits)
        if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
            raise NammError("HeadAllocation needs a non-empty (layers x heads) table of logits.")
        object.__setattr__(self, "logits", rows)
        if not 0.0 <= self.floor < 1.0:
            raise NammError(f"HeadAllocation.floor must lie in [0, 1), got {self.floor}.")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.logits), len(self.logits[0])

    def tensor(self) -> torch.Tensor:
        """``(L, H)`` float64 logits."""
        return torch.tensor(self.logits, dtype=torch.float64)

    def fractions(self, mean_fraction: float) -> torch.Tensor:
        """``(L, H)`` fractions with mean ``mean_fraction``."""
        return allocate_heads(self.tensor(), mean_fraction, self.floor)[0]

    def __str__(self) -> str:
        return f"heads[{self.shape[0]}x{self.shape[1]}, floor {self.floor:g}]"


def fit_head_logits(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Head logits from per-head retrieval scores (attention mass on needles, ``(L, H)``, non-negative).

    The logits are the standardised log scores divided by ``temperature``: a small temperature gives the
    highest-scored heads their whole cache first (a hard ranking), a large one spreads the budget evenly.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).clamp(min=1e-6).log()
    return (s - s.mean()) / (s.std().clamp(min=1e-12) * temperature)


__all__ = ["DepthAllocation", "HeadAllocation", "allocate", "allocate_heads", "fit_head_logits", "layer_logits",
           "relative_depths", "water_fill"]
