"""Crash-safe file writes: write a temporary file next to the target, fsync it, then ``os.replace``
(:func:`atomic_write_bytes` and :func:`atomic_write_text` come from :mod:`namm.jsonl`).

A reader (or a run resumed after ``kill -9``) therefore sees either the old or the new content, never a
half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from namm.jsonl import atomic_write_bytes, atomic_write_text  # noqa: F401 - one implementation, re-exported


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Replace ``path`` by ``obj`` as strict JSON (NaN/inf refused), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n")


def atomic_fill_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Let ``fill(tmp_dir)`` write a directory, then swap it in place of ``path``.

    The old directory is only removed after the new one is complete; a crash in between leaves either the
    old directory or ``path.old`` plus the complete new one, never a half-filled ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    fill(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
