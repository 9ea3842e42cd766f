"""Statistics for comparing policies: scores relative to the full cache with bootstrap confidence intervals.

A comparison is made over *groups* (a task at one prompt length and seed); each group holds paired per-sample
columns (e.g. a policy's score and the full cache's on the same samples). The bootstrap resamples samples
within each group, with the same indices for every column, and recomputes the statistic from the per-group
column means; the interval is the percentile interval of the resampled statistics (seeded numpy resampling).

* :func:`relative_score`: mean over groups of ``mean(policy) / mean(full)`` (groups where the full cache scores 0
  are left out; so is a group in a resample where the resampled full mean is 0). Full against itself is
  exactly 1 in every resample, so its interval is ``[1, 1]``.
* :func:`paired_difference`: mean over groups of ``(mean(a) - mean(b)) / mean(full)``, the difference of two
  policies' relative scores, with per-sample wins, ties and losses.
* :func:`mean_difference`: mean over groups of ``mean(a) - mean(b)`` (e.g. answer NLL against the full cache).
* :func:`group_mean`: mean over groups of one column's mean (e.g. the share of outputs equal to the full cache's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "Paired", "bootstrap", "group_mean", "mean_difference", "paired_difference", "relative_score"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (``nan`` everywhere when the statistic is undefined)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return "n/a" if np.isnan(self.estimate) else f"{self.estimate:.2f} [{self.low:.2f}, {self.high:.2f}]"

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (the difference is "real" at this level)."""
        return not np.isnan(self.estimate) and (value < self.low or value > self.high)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of ``a`` against ``b``: the difference of relative scores and per-sample counts."""

    difference: Interval
    wins: int
    ties: int
    losses: int


def _group_means(groups: Sequence[np.ndarray], resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group column means: ``(G, K)`` on the data and ``(R, G, K)`` over ``R`` within-group resamples."""
    rng = np.random.default_rng(seed)
    point = np.stack([g.mean(axis=0) for g in groups])
    boot = np.empty((resamples, len(groups), point.shape[1]))
    for i, g in enumerate(groups):
        idx = rng.integers(0, g.shape[0], size=(resamples, g.shape[0]))
        boot[:, i] = g[idx].mean(axis=1)
    return point, boot


def bootstrap(
    groups: Sequence[np.ndarray], statistic: Callable[[np.ndarray], np.ndarray], *, resamples: int = 2000,
    seed: int = 0, level: float = 0.95,
) -> Interval:
    """Percentile bootstrap of ``statistic`` over samples resampled within each group.

    Args:
        groups: per group an ``(n_g, K)`` array of paired columns (rows are samples, ``n_g >= 1``).
        statistic: maps per-group column means ``(..., G, K)`` to ``(...)`` (vectorised over leading axes); it
            may return ``nan`` for a resample where it is undefined (left out of the interval).
        resamples, seed, level: number of resamples, the numpy seed, the interval's coverage.
    """
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return Interval(float("nan"), float("nan"), float("nan"), level)
    point, boot = _group_means(groups, resamples, seed)
    estimate = float(statistic(point))
    values = statistic(boot)
    values = values[~np.isnan(values)]
    if np.isnan(estimate) or not len(values):
        return Interval(estimate, float("nan"), float("nan"), level)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), level)


def _usable(groups: Sequence[np.ndarray], full_column: int) -> list[np.ndarray]:
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g)]
    return [g for g in arrays if g[:, full_column].mean() > 0]


def _ratio_mean(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    counts = (~np.isnan(ratio)).sum(axis=-1)
    sums = np.nansum(ratio, axis=-1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def relative_score(pairs: Sequence[np.ndarray], **kwargs) -> Interval:
    """Mean over groups of a policy's mean score over the full cache's, with its bootstrap interval.

    Args:
        pairs: per group an ``(n_g, 2)`` array, columns ``(policy score, full score)`` of the same samples.
        kwargs: passed to :func:`bootstrap`.
    """
    return bootstrap(_usable(pairs, 1), lambda m: _ratio_mean(m[..., 0], m[..., 1]), **kwargs)


def paired_difference(triples: Sequence[np.ndarray], **kwargs) -> Paired:
    """``a``'s relative score minus ``b``'s, with per-sample wins / ties / losses of ``a`` over ``b``.

    Args:
        triples: per group an ``(n_g, 3)`` array, columns ``(a score, b score, full score)`` of the same samples.
        kwargs: passed to :func:`bootstrap`.
    """
    usable = _usable(triples, 2)
    diff = bootstrap(usable, lambda m: _ratio_mean(m[..., 0] - m[..., 1], m[..., 2]), **kwargs)
    a = np.concatenate([g[:, 0] for g in triples if len(g)]) if triples else np.zeros(0)
    b = np.concatenate([g[:, 1] for g in triples if len(g)]) if triples else np.zeros(0)
    return Paired(diff, int((a > b).sum()), int((a == b).sum()), int((a < b).sum()))


def mean_difference(pairs: Sequence[np.ndarray], **kwargs) -> Interval:
    """Mean over groups of ``mean(a) - mean(b)`` with its bootstrap interval (``pairs``: ``(n_g, 2)`` arrays)."""
    return bootstrap(pairs, lambda m: (m[..., 0] - m[..., 1]).mean(axis=-1), **kwargs)


def group_mean(columns: Sequence[np.ndarray], **kwargs) -> Interval:
    """Mean over groups of the first column's mean, with its bootstrap interval (``columns``: ``(n_g, K)`` arrays)."""
    return bootstrap(columns, lambda m: m[..., 0].mean(axis=-1), **kwargs)
