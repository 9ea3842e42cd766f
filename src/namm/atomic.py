"""Atomic file replacement: every results file namm writes (results JSON, tables, plots, run state, checkpoint
directories) goes through this module.

A file is written to a temporary file next to the target (same directory, so the rename stays on one file
system), flushed and fsynced, then renamed over the target with ``os.replace``. A reader, or a run resumed
after a crash or ``kill -9``, sees the old content or the new, never a half-written file; when the write
fails part-way (an exception, a full disk) the temporary file is removed and the old file is untouched.
A directory (a checkpoint) is filled in a temporary directory and swapped in whole (:func:`atomic_fill_dir`).

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: replace a file by bytes / UTF-8 text.
* :func:`atomic_write_json`: strict JSON (NaN and infinities refused), sorted keys, one trailing newline.
* :func:`atomic_save_figure`: a matplotlib figure, in the format named by the file's suffix.
* :func:`atomic_fill_dir`: let a callback fill a directory, then swap it in place of the old one.

Appending to JSON-lines records is :mod:`namm.jsonl`'s job (an fsynced append is already crash-safe there).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (the old file stays intact if the write fails)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> None:
    """Replace ``path`` by ``obj`` as strict JSON (NaN/inf refused, keys sorted), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n")


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """Save a matplotlib ``fig`` to ``path`` atomically, in the format of its suffix (``.png``, ``.pdf``, ...)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def atomic_fill_dir(path: str | os.PathLike, fill: Callable[[Path], object]) -> None:
    """Let ``fill(tmp_dir)`` write a directory, then swap it in place of ``path``.

    The old directory is only removed after the new one is complete; a crash in between leaves either the
    old directory or ``.<name>.old`` plus the complete new one, never a half-filled ``path``. The new files
    are fsynced before the swap. If ``fill`` (or a sync) raises, the partial directory is removed and ``path``
    is untouched.
    """
    path = Path(path)
    tmp = _temporary(path)
    old = path.with_name(f".{path.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):  # on disk before the swap
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


__all__ = ["atomic_fill_dir", "atomic_save_figure", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
