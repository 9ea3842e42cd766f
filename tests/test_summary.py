"""namm.summary: one summary of a run's statistics, names that say what each number is, old records still read."""

from __future__ import annotations

import pytest

from namm.engine import GenerationStats
from namm.summary import (
    SUMMARY_VERSION,
    mean_kept_tokens_after_each_step,
    mean_kept_tokens_after_steps,
    summarise,
)


def _stats(**overrides) -> GenerationStats:
    """Two layers of two heads: steps at 8 (kept 4 per head) and 16 (kept 6), 10 per head at the end."""
    base = dict(
        prompt_tokens=[16], generated_tokens=[4], kept_tokens=[[10.0, 10.0], [10.0, 10.0]],
        steps=[{"layer": 0, "n_seen": 8, "kept": [[4, 4]]}, {"layer": 1, "n_seen": 8, "kept": [[4, 4]]},
               {"layer": 0, "n_seen": 16, "kept": [[6, 6]]}, {"layer": 1, "n_seen": 16, "kept": [[6, 6]]}],
        mean_kv_tokens=7.5, row_mean_kv_tokens=[7.5], peak_kv_tokens=12, full_kv_tokens=20, kv_bytes=640,
        mean_kv_bytes=480.0, peak_kv_bytes=768, padding_fraction=0.0, prefill_seconds=1.0, decode_seconds=0.5,
        memory_seconds=0.25, probe_seconds=0.0, _mean_full_tokens=15.0,
    )
    return GenerationStats(**(base | overrides))


def test_summary_names_the_cache_at_the_end_and_after_the_steps():
    s = summarise(_stats())
    assert s.kept_tokens_at_end == [[10, 10], [10, 10]]
    assert all(isinstance(v, int) for row in s.kept_tokens_at_end for v in row)  # token counts, not floats
    assert s.mean_kept_tokens_at_end == 10.0  # after decoding: the cache grew past the last step
    assert s.mean_kept_tokens_after_steps == 5.0  # what a fixed budget corresponds to
    assert s.mean_kept_tokens_after_each_step == [[8, 4.0], [16, 6.0]] and s.memory_steps == [8, 16]
    assert (s.prompt_tokens, s.generated_tokens, s.total_tokens) == (16, 4, 20)
    assert s.cache_fraction == 0.5 and s.seconds == 1.5
    record = s.to_record()
    assert record["summary_version"] == SUMMARY_VERSION == 2
    assert mean_kept_tokens_after_steps(record) == 5.0
    assert mean_kept_tokens_after_each_step(record) == [[8, 4.0], [16, 6.0]]


def test_a_run_without_memory_steps():
    s = summarise(_stats(steps=[]))
    assert s.mean_kept_tokens_after_steps is None and s.mean_kept_tokens_after_each_step == [] and s.memory_steps == []
    assert mean_kept_tokens_after_steps(s.to_record()) is None


def test_old_records_are_read_by_their_old_names():
    old = {"id": "0", "kept_tokens": [[10, 10]], "mean_kept_tokens": 5.0, "kept_per_step": [[8, 4.0], [16, 6.0]]}
    assert mean_kept_tokens_after_steps(old) == 5.0  # the harness's old name meant "after the steps"
    assert mean_kept_tokens_after_each_step(old) == [[8, 4.0], [16, 6.0]]
    assert mean_kept_tokens_after_each_step({"mean_kept_tokens": 5.0}) is None  # predates per-step sizes


def test_a_batch_is_refused():
    with pytest.raises(ValueError, match="one-prompt run"):
        summarise(_stats(prompt_tokens=[16, 12], generated_tokens=[4, 4]))
