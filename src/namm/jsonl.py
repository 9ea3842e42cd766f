"""Crash-safe JSON-lines records that survive ``kill -9`` and damage (whole files are replaced by :mod:`namm.atomic`).

* :func:`append_record` appends one record as one line and fsyncs it. If the file does not end with a
  newline (a write cut short, or an edit by another tool), one is written first, so two records never
  share a line.
* :func:`read_records` returns every valid record (a JSON object on its own line). Lines that are not
  (a torn last line after a crash, a damaged line anywhere) are moved to ``<file>.bad`` where the user
  can see them, the file is rewritten atomically with the valid lines only, and the returned
  :class:`Records` says what was set aside; no valid record is ever dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from namm.atomic import atomic_write_bytes
from namm.errors import NammError


def writable_dir(path: str | os.PathLike, what: str | None = None) -> Path:
    """Create the directory ``path`` if needed and check that files can be written in it.

    Raises a :class:`NammError` naming ``what`` (e.g. ``"--out"``; default: the path) when ``path`` is a
    file, cannot be created or is not writable, so a command can refuse before doing any work.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if path.exists() and not path.is_dir():
        raise NammError(f"{name} is a file; give a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".namm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise NammError(f"{name} is not a writable directory ({err.strerror or err}).") from None
    return path


def bad_lines_file(path: str | os.PathLike) -> Path:
    """Where :func:`read_records` sets aside the unreadable lines of ``path``: ``<path>.bad``."""
    path = Path(path)
    return path.with_name(path.name + ".bad")


@dataclass
class Records:
    """What :func:`read_records` found: the valid ``records`` and the unreadable lines it set aside."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    set_aside: int = 0

    @property
    def message(self) -> str | None:
        """One line for the user when lines were set aside, else None."""
        if not self.set_aside:
            return None
        lines = "line" if self.set_aside == 1 else "lines"
        kept = len(self.records)
        return (f"{self.path}: {self.set_aside} unreadable {lines} (damaged, or cut short by an interrupted write) "
                f"moved to {bad_lines_file(self.path)}; {kept} valid record{' is' if kept == 1 else 's are'} kept.")


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def read_records(path: str | os.PathLike, repair: bool = True) -> Records:
    """Every valid record of a JSON-lines file (none if the file does not exist), in file order.

    With ``repair`` (the default), unreadable lines are appended to ``<path>.bad`` (fsynced first), then
    ``path`` is atomically rewritten with the valid lines, and a missing final newline is added; without
    it the file is left untouched.
    """
    path = Path(path)
    if not path.exists():
        return Records(path)
    data = path.read_bytes()
    good: list[bytes] = []
    bad: list[bytes] = []
    records = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            bad.append(line)
        else:
            good.append(line)
            records.append(record)
    if repair and bad:
        with open(bad_lines_file(path), "ab") as f:
            f.write(b"".join(line + b"\n" for line in bad))
            f.flush()
            os.fsync(f.fileno())
        atomic_write_bytes(path, b"".join(line + b"\n" for line in good))
    elif repair and data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return Records(path, records, len(bad))


def append_record(path: str | os.PathLike, record: dict[str, Any], *, allow_nan: bool = True) -> None:
    """Append ``record`` as one JSON line and fsync it (after a newline if the file lacks a final one)."""
    path = Path(path)
    line = json.dumps(record, allow_nan=allow_nan) + "\n"
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                line = "\n" + line
    with open(path, "ab") as f:
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


__all__ = [
    "Records",
    "append_record",
    "bad_lines_file",
    "read_records",
    "writable_dir",
]
