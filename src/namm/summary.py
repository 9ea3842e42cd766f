"""One summary of a one-prompt :func:`namm.engine.generate` run, shared by ``namm generate --json``, the harness's
records (``namm eval`` / ``namm compare``) and ``namm bench``'s records.

:func:`summarise` turns :class:`~namm.engine.GenerationStats` into a :class:`RunSummary` whose names say what
each number is. Cache sizes are tokens per managed layer and KV head:

* ``kept_tokens_at_end``: ``[layer][head]`` tokens in the cache when the run ended (after decoding).
* ``mean_kept_tokens_at_end``: their mean over layers and heads.
* ``mean_kept_tokens_after_steps``: the mean over memory steps (and layers, heads) of the tokens kept right
  after each step, what a fixed budget corresponds to (``None`` when no step ran). Baselines matched to a
  NAMM's mean budget get this number.
* ``mean_kept_tokens_after_each_step``: ``[[n_seen, mean tokens per head right after that step], ...]``.
* ``memory_steps``: the number of tokens seen at each memory step.
* ``mean_kv_tokens`` / ``cache_fraction``: mean tokens per head over the run's forward calls (token-weighted)
  and the same relative to a full cache; ``peak_kv_tokens``: the most any head held (just before an eviction).
* ``kv_bytes`` / ``peak_kv_bytes``: key-value storage of all layers at the end / at its peak;
  ``padding_fraction``: the share of that storage that is per-head compaction padding.
* ``seconds`` = ``prefill_seconds`` + ``decode_seconds``; ``memory_seconds`` (memory steps) and ``probe_seconds``
  (a probing policy's extra forward passes) are inside them.

Record versions. :meth:`RunSummary.to_record` writes ``"summary_version": 2``. Records without it, written by
older code and still read when a harness or bench run resumes, named the sizes differently: ``kept_tokens``
(at the end), ``mean_kept_tokens`` (the mean *after the steps*, while ``namm generate --json`` used the same
name for the mean *at the end*) and ``kept_per_step``. Read a record's sizes with
:func:`mean_kept_tokens_after_steps` and :func:`mean_kept_tokens_after_each_step`, which understand both.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

SUMMARY_VERSION = 2


def _count(value: float) -> int | float:
    """A token count as an int when it is whole (JSON shows ``16``, not ``16.0``)."""
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class RunSummary:
    """The statistics of a one-prompt run under names that say what they are (see the module docstring)."""

    prompt_tokens: int
    generated_tokens: int
    total_tokens: int
    kept_tokens_at_end: list[list[int | float]]
    mean_kept_tokens_at_end: float
    mean_kept_tokens_after_steps: float | None
    mean_kept_tokens_after_each_step: list[list[int | float]]
    memory_steps: list[int]
    mean_kv_tokens: float
    cache_fraction: float
    peak_kv_tokens: int
    kv_bytes: int
    peak_kv_bytes: int
    padding_fraction: float
    seconds: float
    prefill_seconds: float
    decode_seconds: float
    memory_seconds: float
    probe_seconds: float

    def to_record(self) -> dict:
        """The JSON-able fields plus ``summary_version``."""
        return {**asdict(self), "summary_version": SUMMARY_VERSION}


def summarise(stats) -> RunSummary:
    """The :class:`RunSummary` of a one-prompt run's :class:`~namm.engine.GenerationStats`.

    Raises:
        ValueError: ``stats`` is of a batch of several prompts (their token counts differ per row).
    """
    if len(stats.prompt_tokens) != 1:
        raise ValueError(f"summarise() takes a one-prompt run, got a batch of {len(stats.prompt_tokens)}.")
    at_end = [v for row in stats.kept_tokens for v in row]
    after = [v for step in stats.steps for row in step["kept"] for v in row]
    by_seen: dict[int, list[float]] = {}
    for step in stats.steps:
        by_seen.setdefault(int(step["n_seen"]), []).extend(v for row in step["kept"] for v in row)
    return RunSummary(
        prompt_tokens=int(stats.prompt_tokens[0]),
        generated_tokens=int(stats.generated_tokens[0]),
        total_tokens=int(stats.prompt_tokens[0] + stats.generated_tokens[0]),
        kept_tokens_at_end=[[_count(v) for v in row] for row in stats.kept_tokens],
        mean_kept_tokens_at_end=statistics.fmean(at_end) if at_end else 0.0,
        mean_kept_tokens_after_steps=statistics.fmean(after) if after else None,
        mean_kept_tokens_after_each_step=[[n, statistics.fmean(v)] for n, v in sorted(by_seen.items())],
        memory_steps=sorted(by_seen),
        mean_kv_tokens=stats.mean_kv_tokens,
        cache_fraction=stats.cache_fraction,
        peak_kv_tokens=stats.peak_kv_tokens,
        kv_bytes=stats.kv_bytes,
        peak_kv_bytes=stats.peak_kv_bytes,
        padding_fraction=stats.padding_fraction,
        seconds=stats.seconds,
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        memory_seconds=stats.memory_seconds,
        probe_seconds=stats.probe_seconds,
    )


def _legacy(record: dict) -> bool:
    return "summary_version" not in record


def mean_kept_tokens_after_steps(record: dict) -> float | None:
    """A record's mean tokens per head right after its memory steps (``None``: no step ran); any version."""
    return record["mean_kept_tokens"] if _legacy(record) else record["mean_kept_tokens_after_steps"]


def mean_kept_tokens_after_each_step(record: dict) -> list[list[int | float]] | None:
    """A record's ``[[n_seen, mean tokens per head after the step], ...]``; ``None`` for a record of a version
    that did not store them."""
    return record.get("kept_per_step") if _legacy(record) else record["mean_kept_tokens_after_each_step"]


__all__ = [
    "SUMMARY_VERSION",
    "RunSummary",
    "mean_kept_tokens_after_each_step",
    "mean_kept_tokens_after_steps",
    "summarise",
]
