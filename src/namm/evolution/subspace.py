"""Search a few named groups of the NAMM's parameters, the others held at a fixed start.

CMA-ES on all 4,172 BAM parameters with a population of 8-16 random-walks in the directions that barely
change the score (docs/evolution.md). A :class:`Subspace` lets it search, e.g., only the linear head and
the depth allocation (with the BAM's qkv/out weights at zero the scorer is a linear function of each
token's features, and in budgeted mode only the ranking within a head matters), starting from a chosen
point such as a classic rule.

``x`` (what CMA-ES sees) is the concatenation of the searched groups in flat-vector order; ``embed``
writes it into a copy of the full start vector.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from namm.errors import NammError
from namm.memory.bam import param_shapes
from namm.memory.config import NAMMConfig


class Subspace:
    """Named parameter groups of a NAMM config to search, and the full vector everything else keeps.

    Args:
        config: the NAMM configuration (defines the flat layout, :func:`namm.memory.bam.param_shapes`).
        groups: names of the searched groups (e.g. ``["head_weight", "depth_logits"]``), or of a range of one
            (``"head_weight[25:27]"``: its entries 25 and 26); empty: all.
        start: ``{group: values}`` start values (flattened row-major); unnamed groups start at zero.
    """

    def __init__(self, config: NAMMConfig, groups: list[str] | None = None, start: dict[str, Any] | None = None):
        layout, offset = {}, 0
        for name, shape in param_shapes(config):
            size = math.prod(shape)
            layout[name] = (offset, size)
            offset += size
        self.n_full = offset
        groups = list(groups or layout)
        spans = [_span(g, layout) for g in groups]
        unknown = [g for g in start or {} if g not in layout]
        if unknown:
            raise NammError(f"search: unknown parameter group {unknown[0]!r}; this NAMM has {list(layout)}.")
        self.full_start = np.zeros(self.n_full)
        for name, values in (start or {}).items():
            lo, size = layout[name]
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            if v.shape != (size,) or not np.all(np.isfinite(v)):
                raise NammError(f"search.start.{name}: expected {size} finite values, got {v.size}.")
            self.full_start[lo : lo + size] = v
        order = sorted(set(zip(groups, spans, strict=True)), key=lambda gs: gs[1])
        self.groups = [g for g, _ in order]
        self.index = np.concatenate([np.arange(lo, hi) for _, (lo, hi) in order])
        if np.unique(self.index).size != self.index.size:
            raise NammError(f"search.groups: {groups} name some parameters twice.")

    @classmethod
    def from_recipe(cls, config: NAMMConfig, search: dict[str, Any]) -> Subspace:
        groups = search.get("groups") or None
        if groups is not None and (not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)):
            raise NammError(f"search.groups: expected a list of parameter group names, got {groups!r}.")
        start = search.get("start") or {}
        if not isinstance(start, dict):
            raise NammError(f"search.start: expected a mapping of group -> values, got {start!r}.")
        return cls(config, groups, start)

    @property
    def dim(self) -> int:
        return int(self.index.size)

    def initial(self) -> np.ndarray:
        """``(d,)`` the searched coordinates of the start vector."""
        return self.full_start[self.index].copy()

    def embed(self, x: np.ndarray) -> np.ndarray:
        """``(d,)`` or ``(P, d)`` searched coordinates -> ``(n,)`` or ``(P, n)`` full parameter vectors."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dim:
            raise NammError(f"Subspace of {self.dim} coordinates got vectors of {x.shape[-1]}.")
        out = np.broadcast_to(self.full_start, (*x.shape[:-1], self.n_full)).copy()
        out[..., self.index] = x
        return out


def _span(group: str, layout: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """``"name"`` or ``"name[lo:hi]"`` (entries ``lo .. hi - 1`` of the flattened group) -> flat ``(start, end)``."""
    m = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", group)
    if m is None or m.group(1) not in layout:
        name = m.group(1) if m else group
        raise NammError(f"search: unknown parameter group {name!r}; this NAMM has {list(layout)} (a part of one: "
                        "'head_weight[25:27]').")
    offset, size = layout[m.group(1)]
    lo = int(m.group(2) or 0)
    hi = size if m.group(3) in (None, "") else int(m.group(3))
    if not 0 <= lo < hi <= size:
        raise NammError(f"search: {group!r} is not a non-empty range of the {size} entries of {m.group(1)!r}.")
    return offset + lo, offset + hi


__all__ = ["Subspace"]
