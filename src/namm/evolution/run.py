"""The evolution loop: CMA-ES over NAMM parameters, stage after stage, resumable after any crash.

Run directory layout::

    recipe.yaml                the recipe (a resumed run must be given the same one)
    code.json                  the code each start and resume ran (namm version, git commit of its source and
                               whether that checkout had uncommitted changes); a resume with other code warns
    prepared.done              marker: the ``prepare`` hook finished (it is not rerun on resume)
    optimizer.json             CMA-ES state after the last finished generation (the fitness told, replayed on
                               resume: :mod:`namm.evolution.optimizer`) + the loop's bookkeeping
    log.jsonl                  one record per finished generation
    full_scores.json           full-cache score per task and sample id (computed once)
    fitness.png                fitness / cache-fraction curves (rewritten every generation)
    checkpoints/latest/        the CMA-ES mean after the last finished generation
    checkpoints/best/          the mean with the best validation score so far

Per generation: ask the population, draw ``samples_per_task`` ids per training task (from ``(seed,
generation)``, shared by all members), score members and the full cache, compute the fitness, tell, maybe
validate the mean, then write checkpoints, the log record and finally the optimizer state. A crash at
any point loses at most the generation in flight: on resume, log records past the saved state are
dropped and that generation is redone identically (every random draw is seeded).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from namm.atomic import atomic_fill_dir, atomic_write_json, atomic_write_text
from namm.errors import NammError
from namm.evolution.backends import LocalBackend, RayBackend
from namm.evolution.evaluator import (
    Evaluator,
    FullScoreCache,
    check_result,
    fitness,
    mean_cache_fraction,
    select_samples,
    validation_samples,
)
from namm.evolution.optimizer import CMAES
from namm.evolution.plot import plot_run
from namm.evolution.recipe import Recipe, Stage, load_recipe
from namm.jsonl import append_record, read_records

PREPARED_MARKER = "prepared.done"
#: recipe fields that only say where evaluations run; they may change when a run is resumed.
EXECUTION_FIELDS = ("backend", "ray")


@dataclass
class EvolveResult:
    """Outcome of :func:`evolve`."""

    run_dir: Path
    generations: int
    mean: np.ndarray
    sigma: float
    best_validation: float | None
    best_generation: int | None


def make_backend(recipe: Recipe, evaluator_factory: Callable[[], Evaluator]):
    """The recipe's backend: a :class:`LocalBackend` on ``evaluator_factory()`` or a :class:`RayBackend`."""
    if recipe.backend == "ray":
        r = recipe.ray
        return RayBackend(
            evaluator_factory,
            r.num_workers,
            address=r.address,
            members_per_batch=recipe.members_per_batch,
            num_cpus_per_worker=r.num_cpus_per_worker,
            num_gpus_per_worker=r.num_gpus_per_worker,
        )
    return LocalBackend(evaluator_factory(), recipe.members_per_batch)


def evolve(
    recipe: Recipe | str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool,
    evaluator_factory: Callable[[], Evaluator],
    progress: bool = True,
    *,
    save_checkpoint: Callable[[np.ndarray, Path], None],
    prepare: Callable[[Path], None] | None = None,
    plot: bool = True,
) -> EvolveResult:
    """Run (or resume) the evolution described by ``recipe`` in ``run_dir``.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML recipe.
        run_dir: run directory (created if missing). Refused if it already holds a run and ``resume`` is
            False, or holds a run of a different recipe (only ``backend``/``ray`` may change on resume).
        resume: continue the run in ``run_dir`` from its last finished generation.
        evaluator_factory: zero-argument callable building an :class:`Evaluator`; picklable for the Ray backend.
        progress: show rich progress bars.
        prepare: called once with ``run_dir`` before the first generation and before any evaluator is built
            (e.g. to gather normalisation statistics); a marker file keeps it from running again on resume.
        save_checkpoint: ``save_checkpoint(params, directory)`` fills a checkpoint directory with the
            NAMM parameters (e.g. :func:`namm.evolution.lm.checkpoint_writer`).
        plot: rewrite ``fitness.png`` after every generation (``plot_run`` can draw it later too).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run_dir):
        _check_run_dir(recipe, run_dir, resume)
        _record_code(run_dir)
        if prepare is not None and not (run_dir / PREPARED_MARKER).exists():
            prepare(run_dir)
            atomic_write_text(run_dir / PREPARED_MARKER, "prepare hook finished\n")
        backend = make_backend(recipe, evaluator_factory)
        try:
            return _Loop(recipe, run_dir, backend, save_checkpoint, progress, plot).run()
        finally:
            backend.close()


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the run directory (released by the OS even after ``kill -9``)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise NammError(f"{run_dir} is in use by another evolution process.") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _comparable(recipe: Recipe) -> dict[str, Any]:
    d = recipe.to_dict()
    return {k: v for k, v in d.items() if k not in EXECUTION_FIELDS}


def _check_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite work; on resume, insist on the same recipe. Writes ``recipe.yaml``."""
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.exists():
        if not resume:
            raise NammError(
                f"{run_dir} already holds an evolution run; resume it (--resume) or choose another directory."
            )
        old, new = _comparable(load_recipe(recipe_path)), _comparable(recipe)
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            raise NammError(
                f"{run_dir} was started with a different recipe (fields differ: {', '.join(diff)}); "
                "resume it with its own recipe.yaml or start a new run directory."
            )
    elif any(p.name != ".lock" for p in run_dir.iterdir()):
        raise NammError(
            f"{run_dir} is not empty and holds no evolution run (no recipe.yaml); choose another directory."
        )
    atomic_write_text(recipe_path, recipe.to_yaml())


def code_version() -> dict[str, Any]:
    """The running namm: its version and, when its source is a git checkout, the commit and whether the
    checkout's ``src`` has uncommitted changes (``None`` where git cannot tell)."""
    import subprocess  # noqa: PLC0415

    from namm import __version__  # noqa: PLC0415

    src = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"namm": __version__, "source": str(src), "commit": None, "dirty": None}
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        info["commit"] = run("rev-parse", "HEAD")
        info["dirty"] = bool(run("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _record_code(run_dir: Path) -> None:
    """Append the running code to ``code.json``; warn when it differs from the code the run started with."""
    path = run_dir / "code.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    now = {**code_version(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if runs and (runs[0].get("commit"), runs[0].get("namm")) != (now["commit"], now["namm"]):
        print(f"warning: {run_dir} started with namm {runs[0].get('namm')} at commit {runs[0].get('commit')}; "
              f"resuming with {now['namm']} at {now['commit']} (a resume is exact only with the same code).",
              file=sys.stderr)
    atomic_write_json(path, {"runs": [*runs, now]})


def _progress(enabled: bool):
    """The loop's progress bar on stderr (stdout stays for results); ``enabled=False`` draws nothing."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


class _Loop:
    """One evolve() call: state, pools, and the generation loop."""

    def __init__(self, recipe: Recipe, run_dir: Path, backend, save_checkpoint, progress: bool, plot: bool) -> None:
        self.recipe, self.run_dir, self.backend = recipe, run_dir, backend
        self.save_checkpoint, self.progress, self.plot = save_checkpoint, progress, plot
        self.log_path = run_dir / "log.jsonl"
        self.full = FullScoreCache(run_dir / "full_scores.json")
        self.opt, self.book = self._load_optimizer()
        self.stage_ends = [int(e) for e in np.cumsum([s.generations for s in recipe.stages])]
        self.train_pools = self._train_pools()
        self.val_ids = self._validation_ids()

    # ------------------------------------------------------------------------- setup
    def _load_optimizer(self) -> tuple[CMAES, dict[str, Any]]:
        r = self.recipe
        mean0 = self.backend.initial_params()
        if CMAES.saved_in(self.run_dir):
            opt, book = CMAES.load(self.run_dir)
            expected = {"n_params": len(mean0), "popsize": r.population, "diagonal": r.diagonal, "seed": r.seed,
                        "csa": r.csa}
            got = {k: opt.config.get(k, False) for k in expected}
            if got != expected:
                raise NammError(f"{self.run_dir}/optimizer.json has config {got}, the recipe needs {expected}.")
        else:
            opt, book = CMAES(len(mean0), r.population, r.sigma0, r.seed, r.diagonal, mean0, csa=r.csa), {}
        book.setdefault("best_validation", None)
        book.setdefault("best_generation", None)
        self._truncate_log(opt.generation)
        return opt, book

    def _truncate_log(self, generation: int) -> None:
        """Drop log records of generations after the saved state (the one in flight at a crash)."""
        found = read_records(self.log_path)  # a record cut short by a crash is set aside in log.jsonl.bad
        if found.message:
            print(found.message, file=sys.stderr)
        keep = [r for r in found.records if r.get("generation", 0) <= generation]
        if len(keep) != len(found.records):
            atomic_write_text(self.log_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))

    def _train_pools(self) -> dict[str, list[str]]:
        pools = {}
        for si, stage in enumerate(self.recipe.stages):
            for ti, task in enumerate(stage.tasks):
                pool = pools.get(task.key) or self.backend.sample_pool(task.key, "train")
                if len(pool) < self.recipe.samples_per_task:
                    raise NammError(
                        f"stages[{si}].tasks[{ti}] ({task.key}) has {len(pool)} training samples, fewer than "
                        f"samples_per_task={self.recipe.samples_per_task}."
                    )
                pools[task.key] = pool
        return pools

    def _validation_ids(self) -> dict[str, list[str]]:
        v = self.recipe.validation
        if v is None:
            return {}
        ids = {}
        for ti, task in enumerate(v.tasks):
            pool = self.backend.sample_pool(task.key, "validation")
            if not pool:
                raise NammError(f"validation.tasks[{ti}] ({task.key}) has no validation samples.")
            train = self.train_pools.get(task.key) or self.backend.sample_pool(task.key, "train")
            overlap = set(pool) & set(train)
            if overlap:
                raise NammError(
                    f"validation.tasks[{ti}] ({task.key}): {len(overlap)} validation samples are also training "
                    f"samples (e.g. {sorted(overlap)[:3]}); the splits must be disjoint."
                )
            ids[task.key] = validation_samples(pool, v.samples, self.recipe.validation_seed, task.key)
        return ids

    def _stage_at(self, generation: int) -> tuple[int, Stage]:
        for si, end in enumerate(self.stage_ends):
            if generation < end:
                return si, self.recipe.stages[si]
        raise AssertionError(generation)

    # ------------------------------------------------------------------------- one generation
    def _score(self, params: np.ndarray, ids: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray, dict, float]:
        """Fitness ``(P,)``, mean cache fraction ``(P,)``, per-task summary and evaluator seconds."""
        scores, fracs, fulls, seconds, summary = {}, {}, {}, 0.0, {}
        for key, sample_ids in ids.items():
            fulls[key] = self.full.get(key, sample_ids, self.backend.full_scores)
            res = check_result(self.backend.evaluate(params, key, sample_ids), len(params), len(sample_ids), key)
            scores[key], fracs[key], seconds = res.scores, res.cache_fraction, seconds + res.seconds
            summary[key] = {"score": float(res.scores.mean()), "full": float(fulls[key].mean())}
        fit = fitness(scores, fulls, fracs, self.recipe.cache_weight)
        return fit, mean_cache_fraction(fracs), summary, seconds

    def _generation(self) -> dict[str, Any]:
        r, opt = self.recipe, self.opt
        start = time.perf_counter()
        g = opt.generation
        si, stage = self._stage_at(g)
        sigma = opt.sigma
        population = opt.ask()
        ids = {
            t.key: select_samples(self.train_pools[t.key], r.samples_per_task, r.seed, g, t.key) for t in stage.tasks
        }
        fit, frac, summary, eval_seconds = self._score(population, ids)
        opt.tell(population, fit)
        gen = opt.generation
        record: dict[str, Any] = {
            "stage": stage.name,
            "stage_index": si,
            "generation": gen,
            "best": float(fit.max()),
            "mean": float(fit.mean()),
            "median": float(np.median(fit)),
            "cache_fraction": float(frac.mean()),
            "sigma": sigma,
            "tasks": summary,
        }
        mean = opt.mean
        if self.val_ids and (gen % r.validation.every == 0 or gen == self.stage_ends[si]):
            val_fit, val_frac, val_summary, val_seconds = self._score(mean[None, :], self.val_ids)
            record.update(validation=float(val_fit[0]), validation_cache_fraction=float(val_frac[0]))
            record["validation_tasks"] = val_summary
            eval_seconds += val_seconds
            best = self.book["best_validation"]
            if best is None or record["validation"] > best:
                self.book.update(best_validation=record["validation"], best_generation=gen)
                self._checkpoint("best", mean, record)
        self._checkpoint("latest", mean, record)
        record.update(best_validation=self.book["best_validation"], best_generation=self.book["best_generation"])
        record.update(eval_seconds=eval_seconds, seconds=time.perf_counter() - start)
        return record

    def _checkpoint(self, name: str, params: np.ndarray, record: dict[str, Any]) -> None:
        info = {k: record.get(k) for k in ("stage", "generation", "validation")}
        info["sigma_after"] = self.opt.sigma

        def fill(tmp: Path) -> None:
            self.save_checkpoint(params, tmp)
            atomic_write_json(tmp / "evolution.json", info)

        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        atomic_fill_dir(self.run_dir / "checkpoints" / name, fill)

    def _append_log(self, record: dict[str, Any]) -> None:
        append_record(self.log_path, record, allow_nan=False)

    # ------------------------------------------------------------------------- loop
    def run(self) -> EvolveResult:
        total = self.recipe.total_generations
        with _progress(self.progress) as bar:
            task = bar.add_task("evolve", total=total, completed=self.opt.generation, status="")
            while self.opt.generation < total:
                record = self._generation()
                self._append_log(record)
                self.opt.save(self.run_dir, extra=self.book)
                if self.plot:
                    plot_run(self.run_dir, self.run_dir / "fitness.png")
                val = record.get("validation")
                status = f"best {record['best']:.4f} mean {record['mean']:.4f} sigma {record['sigma']:.4g}"
                status += "" if val is None else f" val {val:.4f}"
                bar.update(task, completed=self.opt.generation, description=record["stage"], status=status)
        return EvolveResult(
            run_dir=self.run_dir,
            generations=self.opt.generation,
            mean=self.opt.mean,
            sigma=self.opt.sigma,
            best_validation=self.book["best_validation"],
            best_generation=self.book["best_generation"],
        )
