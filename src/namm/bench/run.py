"""Running a suite: every cell (policy x budget) on every group (task x length x seed), one JSON line per sample.

Records go to ``OUT/records/<group>__<cell>.jsonl``, appended one line per finished sample, so a run killed at
any point resumes where it stopped: finished samples are skipped, a torn line is set aside (:mod:`namm.jsonl`),
and a record made with another setting (model, prompt, policy options or weights, cadence, mode, gold answer)
is refused with a message rather than reused. Cells run in order (Full, then the NAMM, then the suite's list),
each over every group, so a partial run has whole columns of the leaderboard.

Suites overlap (the standard suite's 50% cells are the held-out runs of the shipped memory): ``reuse`` names
other runs' directories, and a sample whose record there has exactly the setting this suite would record (same
group, cell, sample id, model, prompt, policy fingerprint, cadence, mode and gold answer) is copied in, marked
``reused_from``, instead of being computed again. Its times were measured in that run, not this one.

Each record holds the task metric (``score``) and, from the same prefill, the teacher-forced log-likelihood of
the sample's gold answer (``answer_logprob``, ``answer_tokens``, ``answer_nll`` per token; see
:mod:`namm.scoring`), the cache sizes and the times (``seconds`` = prefill + decoding, a probe policy's extra
forward passes included and also given as ``probe_seconds``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from namm import jsonl
from namm.bench.suite import Cell, Suite, TaskSpec
from namm.errors import NammError
from namm.harness import matched_budget, progress_bar, read_records, record_setting, run_sample
from namm.policies import DepthAllocation, Full, Policy, make_policy
from namm.scoring import gold_answer
from namm.tasks import Sample, Task, get_task


@dataclass
class Group:
    """One task at one length and seed: the samples every cell runs on."""

    key: str
    task: Task
    samples: list[Sample]


def group_key(spec: TaskSpec, length: int | None, seed: int) -> str:
    """File-name key of a group, e.g. ``passkey-2048-s7000`` (``-all`` for an untruncated LongBench task)."""
    return f"{spec.task}-{length if length is not None else 'all'}-s{seed}"


def group_keys(suite: Suite) -> list[str]:
    """Every group of the suite, in order (no data or tokenizer needed)."""
    return [group_key(spec, length, seed) for spec in suite.tasks for length in spec.lengths for seed in spec.seeds]


def make_groups(suite: Suite, tokenizer) -> list[Group]:
    """Build every group's samples (deterministic in the suite's seeds)."""
    groups = []
    for spec in suite.tasks:
        task = get_task(spec.task, **spec.options)
        for length in spec.lengths:
            for seed in spec.seeds:
                n = spec.samples
                if n is None:
                    if not hasattr(task, "load"):
                        raise NammError(f"Task {spec.task!r}: samples 'all' applies to LongBench tasks; give a number.")
                    n = len(task.load())
                samples = task.samples(n, seed=seed, length=length, tokenizer=tokenizer)
                if not samples:
                    raise NammError(f"Task {spec.task!r} gave no samples (length {length}, seed {seed}).")
                groups.append(Group(group_key(spec, length, seed), task, samples))
    return groups


def records_file(out_dir: Path, group: str, cell: str) -> Path:
    return out_dir / "records" / f"{group}__{cell}.jsonl"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _by_id(path: Path) -> dict[str, dict]:
    """Finished records by id (unreadable lines, e.g. one torn by a kill, are set aside: namm.jsonl)."""
    return {r["id"]: r for r in read_records(path)}


def _refuse(path: Path, record: dict, setting: dict) -> None:
    recorded = record.get("setting")
    if recorded == setting:
        return
    recorded = recorded or {}
    diff = ", ".join(f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in setting.items() if recorded.get(k) != v)
    raise NammError(f"{path} already holds sample {record['id']} made with another setting ({diff}). Use another "
                    "--out directory for this suite, or delete the file to compute it again.")


class _Policies:
    """Builds each cell's policy for a sample (one NAMM loaded per checkpoint; matched budgets from its records)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.namm: dict[tuple, Policy] = {}
        self.namm_records: dict[str, dict[str, dict]] = {}  # group -> id -> the NAMM's record (complete by then)
        self.allocations: dict[str, DepthAllocation] = {}  # checkpoint -> its learned depth allocation

    def __call__(self, cell: Cell, group: str, sample: Sample) -> Policy:
        if cell.policy == "full":
            return Full()
        if cell.policy == "namm":
            key = (cell.checkpoint, cell.budget)
            if key not in self.namm:
                from namm.memory import NAMM  # noqa: PLC0415

                self.namm[key] = NAMM.from_pretrained(cell.checkpoint, budget=cell.budget)
            return self.namm[key]
        budget = cell.budget
        if isinstance(budget, str):
            if group not in self.namm_records:
                self.namm_records[group] = _by_id(records_file(self.out_dir, group, "namm"))
            namm_records = self.namm_records[group]
            if sample.id not in namm_records:
                raise NammError(f"{cell.label} on {group}: the NAMM has no record of sample {sample.id} to match.")
            budget = matched_budget(namm_records[sample.id], budget)
            if budget is None:
                return Full()
        if cell.allocation is not None:
            return make_policy(cell.policy, budget=budget, allocation=self.allocation(cell.allocation), **cell.options)
        return make_policy(cell.policy, budget=budget, **cell.options)

    def allocation(self, checkpoint: str) -> DepthAllocation:
        """The depth allocation learned by a NAMM checkpoint (an error if it has none)."""
        if checkpoint not in self.allocations:
            from namm.memory import NAMM  # noqa: PLC0415

            logits = NAMM.from_pretrained(checkpoint).depth_logits()
            if logits is None:
                raise NammError(f"NAMM checkpoint {checkpoint!r} has no learned depth allocation (depth_knots is 0).")
            self.allocations[checkpoint] = DepthAllocation.from_sequence(logits.tolist())
        return self.allocations[checkpoint]


@dataclass
class RunCount:
    """What one call of :func:`run_suite` did: samples computed, copied from another run, left to compute."""

    computed: int = 0
    reused: int = 0
    missing: int = 0


def _reusable(sources: list[tuple[Path, dict[str, dict]]], sample_id: str, setting: dict) -> dict | None:
    """The first record of ``sample_id`` among other runs' records (``(run directory, records by id)``) of the
    same cell and group whose setting is exactly ``setting``, marked ``reused_from`` that run (None when no run
    has one)."""
    for source, records in sources:
        record = records.get(sample_id)
        if record is not None and record.get("setting") == setting:
            return record | {"reused_from": str(source)}
    return None


def run_suite(suite: Suite, out_dir: Path, model, tokenizer, *, progress: bool = True,
              reuse: Sequence[Path] = (), compute: bool = True) -> RunCount:
    """Run (or resume) every cell of ``suite`` on every group.

    Args:
        reuse: other runs' directories; a sample whose record there has this suite's exact setting is copied
            (with ``reused_from``: that directory) instead of computed.
        compute: False copies what ``reuse`` offers and computes nothing (the rest is counted as missing).
    """
    for source in reuse:
        if Path(source).resolve() == Path(out_dir).resolve():
            raise NammError(f"--reuse {source} is the output directory itself; name another run's directory.")
        if not (Path(source) / "records").is_dir():
            raise NammError(f"--reuse {source} holds no records/ directory of a bench run.")
    groups = make_groups(suite, tokenizer)
    policies = _Policies(out_dir)
    total = len(suite.cells) * sum(len(g.samples) for g in groups)
    count = RunCount()
    (out_dir / "records").mkdir(parents=True, exist_ok=True)
    with progress_bar(disable=not progress) as bar:
        job = bar.add_task(suite.name, total=total)
        for cell in suite.cells:
            for group in groups:
                path = records_file(out_dir, group.key, cell.label)
                done = _by_id(path)
                sources = [(d, _by_id(records_file(Path(d), group.key, cell.label))) for d in reuse]
                bar.update(job, description=f"{cell.label} {group.key}")
                for sample in group.samples:
                    bar.advance(job)
                    policy = policies(cell, group.key, sample)
                    setting = record_setting(model, sample, policy, delay=suite.delay, chunk_size=suite.chunk_size,
                                             question_agnostic=suite.question_agnostic)
                    setting |= {"answer": _digest(gold_answer(sample, group.task)), "group": group.key}
                    if sample.id in done:
                        _refuse(path, done[sample.id], setting)
                        continue
                    found = _reusable(sources, sample.id, setting)
                    if found is not None:
                        jsonl.append_record(path, found)
                        count.reused += 1
                        continue
                    if not compute:
                        count.missing += 1
                        continue
                    record = run_sample(model, tokenizer, group.task, sample, policy, delay=suite.delay,
                                        chunk_size=suite.chunk_size, question_agnostic=suite.question_agnostic,
                                        score_answer=True)
                    record["setting"] = setting
                    jsonl.append_record(path, record)
                    count.computed += 1
    return count
