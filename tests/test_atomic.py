"""Atomic writes: an interrupted write leaves the old file intact, and every results file goes through them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import namm
from namm import atomic
from namm.atomic import atomic_fill_dir, atomic_save_figure, atomic_write_json, atomic_write_text
from namm.bench.leaderboard import write_section
from namm.evolution import CMAES, FullScoreCache, plot_run
from namm.harness import plot_comparison
from namm.jsonl import append_record


class Interrupted(Exception):
    pass


@pytest.fixture
def interrupt_fsync(monkeypatch):
    """Make the next atomic write die after its data reached the temporary file, before the rename."""

    def arm():
        def fsync(fd):
            raise Interrupted

        monkeypatch.setattr(atomic.os, "fsync", fsync)

    return arm


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_replaces_and_an_interrupted_one_keeps_the_old_file(tmp_path, interrupt_fsync):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n "a": 1\n}\n'
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _entries(tmp_path) == ["results.json"]
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("nan")})  # strict JSON, refused before anything is written
    interrupt_fsync()
    with pytest.raises(Interrupted):
        atomic_write_text(path, "newer, but cut short")
    assert path.read_text() == "new" and _entries(tmp_path) == ["results.json"]  # no temporary left behind


def test_an_interrupted_figure_keeps_the_old_picture(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    path = tmp_path / "plot.png"
    atomic_save_figure(fig, path)
    old = path.read_bytes()
    assert old[:4] == b"\x89PNG"

    def savefig(target, **kwargs):  # writes part of the picture, then dies
        target.write(b"\x89PNG half")
        raise Interrupted

    fig.savefig = savefig
    with pytest.raises(Interrupted):
        atomic_save_figure(fig, path)
    assert path.read_bytes() == old and _entries(tmp_path) == ["plot.png"]


def test_an_interrupted_directory_fill_keeps_the_old_directory(tmp_path):
    target = tmp_path / "checkpoint"
    atomic_fill_dir(target, lambda d: (d / "params.bin").write_bytes(b"old"))

    def fill(d: Path) -> None:
        (d / "params.bin").write_bytes(b"new, half")
        raise Interrupted

    with pytest.raises(Interrupted):
        atomic_fill_dir(target, fill)
    assert (target / "params.bin").read_bytes() == b"old" and _entries(tmp_path) == ["checkpoint"]


def _writers(tmp_path: Path):
    """``(file, write(version))`` for each kind of results file namm writes."""

    def leaderboard(v):
        write_section(tmp_path / "leaderboard.md", "suite", [f"| row {v} |"])

    def comparison_plot(v):
        rows = [{"policy": "full", "cache_fraction": 1.0, "score": 50.0 + v}]
        plot_comparison(rows, tmp_path / "task__results.png", title=f"version {v}")

    def evolution_plot(v):
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        append_record(run / "log.jsonl", {"generation": v, "stage": "s", "best": 0.5, "mean": 0.4, "median": 0.4,
                                          "cache_fraction": 0.5, "sigma": 0.1})
        plot_run(run, tmp_path / "fitness.png")

    def optimizer(v):
        opt = CMAES(4, 4, seed=v)
        x = opt.ask()
        opt.tell(x, -np.sum(x**2, axis=1))
        opt.save(tmp_path, extra={"version": v})

    def full_scores(v):
        FullScoreCache(tmp_path / "full_scores.json").get("task", [f"s{v}"], lambda task, ids: np.array([0.5]))

    def checkpoint(v):
        policy = namm.NAMM(namm.NAMMConfig())
        atomic_fill_dir(tmp_path / "normalisation", policy.save_pretrained)

    return [("leaderboard.md", leaderboard), ("task__results.png", comparison_plot), ("fitness.png", evolution_plot),
            ("optimizer.json", optimizer), ("full_scores.json", full_scores), ("normalisation/config.json", checkpoint)]


@pytest.mark.parametrize("index", range(6))
def test_results_files_survive_an_interrupted_rewrite(tmp_path, interrupt_fsync, index):
    name, write = _writers(tmp_path)[index]
    write(1)
    path = tmp_path / name
    old = path.read_bytes()
    interrupt_fsync()
    with pytest.raises(Interrupted):
        write(2)
    assert path.read_bytes() == old
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


#: direct writes that are not results files (appends, a lock, a probe) or are wrapped by their callers.
ALLOWED = {
    "jsonl.py": "appends fsynced JSON lines; rewrites go through namm.atomic",
    "evolution/run.py": "the run directory's .lock file",
    "models.py": "a converted model is saved to <name>.partial and renamed into place",
    "memory/policy.py": "NAMM.save_pretrained; namm's own writers call it inside atomic_fill_dir",
}
DIRECT_WRITE = re.compile(r"\.write_text\(|\.write_bytes\(|\.savefig\(|save_file\(|json\.dump\(|"
                          r"open\([^)]*[\"'][wax]b?[\"']")


def test_the_package_writes_files_only_through_namm_atomic():
    src = Path(namm.__file__).parent
    offenders = []
    for file in sorted(src.rglob("*.py")):
        rel = file.relative_to(src).as_posix()
        if rel == "atomic.py" or rel in ALLOWED:
            continue
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if DIRECT_WRITE.search(line) and "probe.write_bytes" not in line:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
