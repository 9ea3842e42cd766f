"""What ``namm bench`` does: load the suite and the model, run (or resume) the suite, render the leaderboard."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from namm.atomic import atomic_write_text
from namm.bench.leaderboard import render
from namm.bench.run import RunCount, run_suite
from namm.bench.suite import load_suite
from namm.errors import NammError

#: In a run directory: the name of the suite whose run it holds (written by the first run into it).
SUITE_FILE = "SUITE"


def claim_run_dir(out: Path, name: str, *, write: bool) -> None:
    """Refuse a run directory that holds another suite's run (rendering would overwrite its leaderboard and mix
    its records); otherwise, with ``write``, record ``name`` in it. Directories from before the marker pass."""
    marker = Path(out) / SUITE_FILE
    held = marker.read_text().strip() if marker.is_file() else None
    if held is not None and held != name:
        raise NammError(f"{out} holds the run of suite {held!r}, not {name!r}: give this suite its own --out "
                        "directory (--reuse copies the records that match).")
    if write and held is None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, name + "\n")


def main(suite: str, out: Path, *, model: str | None = None, page: Path | None = None, render_only: bool = False,
         progress: bool = True, reuse: tuple[Path, ...] = (), compute: bool = True) -> tuple[Path, RunCount]:
    """Run ``suite`` (a YAML path or a shipped name) into ``out`` and write its leaderboard to ``page``.

    ``reuse`` and ``compute`` are :func:`namm.bench.run.run_suite`'s (copy matching records from other runs;
    compute nothing).

    Returns:
        The leaderboard page and what this call did (nothing with ``render_only``).
    """
    spec = load_suite(suite)
    claim_run_dir(out, spec.name, write=not render_only)
    count = RunCount()
    if not render_only:
        import namm  # noqa: PLC0415

        mdl, tok = namm.load_model(model or spec.model)
        count = run_suite(spec, out, mdl, tok, progress=progress, reuse=reuse, compute=compute)
    command = "namm bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    return render(spec, out, page, command=command), count
