"""Shared by the benchmark scripts: the filler prompt and writing a marked section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import torch

from namm.bench.leaderboard import write_section as _write_section

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "Some people like to travel by train because it is relaxing and they can read a book. "
)


def make_ids(tok, length: int) -> torch.Tensor:
    """``(1, length)`` token ids of filler text."""
    ids = tok(FILLER * (length // 20 + 10), return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def write_section(path: Path, name: str, lines: list[str]) -> str:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    _write_section(path, name, lines, title="# Benchmarks")
    return "\n".join([f"<!-- {name}:start -->", *lines, f"<!-- {name}:end -->"])
