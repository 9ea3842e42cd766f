"""Running a suite: every cell (policy x budget) on every group (task x length x seed), one JSON line per sample.

Records go to ``OUT/records/<group>__<cell>.jsonl``, appended one line per finished sample, so a run killed at
any point resumes where it stopped: finished samples are skipped, a torn last line is dropped, and a record made
with another setting (model, prompt, policy options or weights, cadence, mode, gold answer) is refused with a
message rather than reused. Cells run in order (Full, then the NAMM, then the suite's list), each over every
group, so a partial run has whole columns of the leaderboard.

Each record holds the task metric (``score``) and, from the same prefill, the teacher-forced log-likelihood of
the sample's gold answer (``answer_logprob``, ``answer_tokens``, ``answer_nll`` per token; see
:mod:`namm.scoring`), the cache sizes and the times (``seconds`` = prefill + decoding, a probe policy's extra
forward passes included and also given as ``probe_seconds``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from namm.bench.suite import Cell, Suite, TaskSpec
from namm.engine import generate
from namm.errors import NammError
from namm.harness import (
    kept_per_step,
    matched_budget,
    mean_kept_after_steps,
    progress_bar,
    read_records,
    record_setting,
)
from namm.policies import Full, Policy, make_policy
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


def bench_sample(model, tokenizer, task: Task, sample: Sample, policy: Policy, *, delay: int, chunk_size: int,
                 question_agnostic: bool) -> dict:
    """Run one sample: generate, score the prediction, and score the gold answer teacher-forced (same prefill)."""
    if question_agnostic and sample.context is None:
        raise NammError(f"Sample {sample.id} of {task.name} has no context/question split for question-agnostic mode.")
    gold = gold_answer(sample, task)
    out = generate(model, tokenizer, sample.context if question_agnostic else sample.prompt, policy,
                   max_new_tokens=sample.max_new_tokens, delay=delay, chunk_size=chunk_size,
                   question=sample.question if question_agnostic else None, answer=gold,
                   max_answer_tokens=sample.max_new_tokens)
    s = out.stats
    return {
        "id": sample.id,
        "task": task.name,
        "policy": policy.describe(),
        "prediction": out.text,
        "answers": sample.answers,
        "score": task.score(out.text, sample),
        "gold": gold,
        "answer_logprob": out.answer.logprob,
        "answer_tokens": out.answer.tokens,
        "answer_nll": out.answer.mean_nll,
        "prompt_tokens": s.prompt_tokens[0],
        "kept_tokens": s.kept_tokens,
        "mean_kept_tokens": mean_kept_after_steps(s),
        "kept_per_step": kept_per_step(s),
        "mean_kv_tokens": s.mean_kv_tokens,
        "cache_fraction": s.cache_fraction,
        "peak_kv_tokens": s.peak_kv_tokens,
        "peak_kv_bytes": s.peak_kv_bytes,
        "padding_fraction": s.padding_fraction,
        "seconds": s.seconds,
        "prefill_seconds": s.prefill_seconds,
        "decode_seconds": s.decode_seconds,
        "memory_seconds": s.memory_seconds,
        "probe_seconds": s.probe_seconds,
    }


def _open_records(path: Path) -> dict[str, dict]:
    """Finished records by id; a last line without its newline (killed mid-write) is dropped."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
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
        self.namm: dict[str, Policy] = {}
        self.namm_records: dict[str, dict[str, dict]] = {}  # group -> id -> the NAMM's record (complete by then)

    def __call__(self, cell: Cell, group: str, sample: Sample) -> Policy:
        if cell.policy == "full":
            return Full()
        if cell.policy == "namm":
            if cell.checkpoint not in self.namm:
                from namm.memory import NAMM  # noqa: PLC0415

                self.namm[cell.checkpoint] = NAMM.from_pretrained(cell.checkpoint)
            return self.namm[cell.checkpoint]
        budget = cell.budget
        if isinstance(budget, str):
            if group not in self.namm_records:
                self.namm_records[group] = _open_records(records_file(self.out_dir, group, "namm"))
            namm_records = self.namm_records[group]
            if sample.id not in namm_records:
                raise NammError(f"{cell.label} on {group}: the NAMM has no record of sample {sample.id} to match.")
            budget = matched_budget(namm_records[sample.id], budget)
            if budget is None:
                return Full()
        return make_policy(cell.policy, budget=budget, **cell.options)


def run_suite(suite: Suite, out_dir: Path, model, tokenizer, *, progress: bool = True) -> int:
    """Run (or resume) every cell of ``suite`` on every group; returns the number of samples computed now."""
    groups = make_groups(suite, tokenizer)
    policies = _Policies(out_dir)
    total = len(suite.cells) * sum(len(g.samples) for g in groups)
    computed = 0
    (out_dir / "records").mkdir(parents=True, exist_ok=True)
    with progress_bar(disable=not progress) as bar:
        job = bar.add_task(suite.name, total=total)
        for cell in suite.cells:
            for group in groups:
                path = records_file(out_dir, group.key, cell.label)
                done = _open_records(path)
                bar.update(job, description=f"{cell.label} {group.key}")
                for sample in group.samples:
                    policy = policies(cell, group.key, sample)
                    setting = record_setting(model, sample, policy, delay=suite.delay, chunk_size=suite.chunk_size,
                                             question_agnostic=suite.question_agnostic)
                    setting |= {"answer": _digest(gold_answer(sample, group.task)), "group": group.key}
                    if sample.id in done:
                        _refuse(path, done[sample.id], setting)
                        bar.advance(job)
                        continue
                    record = bench_sample(model, tokenizer, group.task, sample, policy, delay=suite.delay,
                                          chunk_size=suite.chunk_size, question_agnostic=suite.question_agnostic)
                    record["setting"] = setting
                    with path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    computed += 1
                    bar.advance(job)
    return computed
