"""The evaluation harness: run a policy on a task's samples (resumable JSON lines), compare policies.

``evaluate`` writes one JSON line per sample and skips samples already in the file, so an interrupted
run resumes where it stopped (and says how many records it reused); every record carries its ``setting``
(model, a digest of the prompt, the policy's fingerprint, cadence), and a record made with another
setting is refused, never silently reused. The file is read and appended by :mod:`namm.jsonl`: a damaged
or torn line is set aside in ``<file>.bad`` (and reported), never taken for the end of the file.
``compare`` runs several policies (optionally at several budgets, or at
the cache size a NAMM reached sample by sample) on the same samples and summarises them against the
full cache on those samples.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from namm import jsonl
from namm.atomic import atomic_save_figure, atomic_write_text
from namm.engine import generate
from namm.errors import NammError
from namm.policies import BudgetSchedule, Full, Policy, make_policy
from namm.scoring import gold_answer
from namm.summary import mean_kept_tokens_after_each_step, mean_kept_tokens_after_steps, summarise
from namm.tasks import Sample, Task, count_tokens


def progress_bar(disable: bool = False) -> Progress:
    """A progress bar on stderr (stdout is for results)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=disable, transient=False, console=Console(stderr=True),
    )


def say(message: str) -> None:
    """One line for the user on stderr (resumed records, set-aside lines)."""
    Console(stderr=True, soft_wrap=True).print(message, markup=False, highlight=False, style="dim")


def plural(n: int, word: str) -> str:
    """``"1 sample"``, ``"3 samples"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def budget_label(budget: int | float | str | None) -> str:
    """How tables show a budget: ``"25%"`` for a fraction, ``"256 tokens"`` for a count, text as is."""
    if isinstance(budget, float):
        return f"{budget * 100:g}%"
    if isinstance(budget, int) and not isinstance(budget, bool):
        return plural(budget, "token")
    return "-" if budget is None else str(budget)


def matched_budget(record: dict, mode: str) -> BudgetSchedule | int | None:
    """A baseline's budget matching the NAMM's ``record`` on one sample (None: the NAMM took no step).

    ``"namm"``: the NAMM's cache size at each of its memory steps, as a :class:`BudgetSchedule`;
    ``"namm-mean"``: one token budget, its mean size after the steps (the paper's rule). Records of any
    :mod:`namm.summary` version are read.
    """
    if mode == "namm-mean":
        kept = mean_kept_tokens_after_steps(record)
        return None if kept is None else max(1, round(kept))
    steps = mean_kept_tokens_after_each_step(record)
    if steps is None:
        raise NammError(
            f"Record {record.get('id')!r} of {record.get('task')!r} predates per-step cache sizes; delete its "
            "namm__*.jsonl file in the --out directory so the NAMM runs again, or use --match-budget namm-mean."
        )
    return BudgetSchedule(tuple((int(n), max(1, round(k))) for n, k in steps)) if steps else None


def run_sample(model, tokenizer, task: Task, sample: Sample, policy: Policy, *, delay: int,
               chunk_size: int | None, question_agnostic: bool, score_answer: bool = False) -> dict:
    """Generate for one sample and score it; returns the JSON-able record.

    The record holds the sample, the prediction and its score, then the run's :class:`namm.summary.RunSummary`
    (cache sizes, bytes, times; versioned). With ``score_answer`` the gold answer is also scored teacher-forced
    after the same prefill (``gold``, ``answer_logprob``, ``answer_tokens``, ``answer_nll``; what ``namm bench``
    records).
    """
    if question_agnostic and sample.context is None:
        raise NammError(f"Sample {sample.id} of {task.name} has no context/question split for question-agnostic mode.")
    gold = gold_answer(sample, task) if score_answer else None
    out = generate(
        model, tokenizer, sample.context if question_agnostic else sample.prompt, policy,
        max_new_tokens=sample.max_new_tokens, delay=delay, chunk_size=chunk_size,
        question=sample.question if question_agnostic else None, answer=gold,
        max_answer_tokens=sample.max_new_tokens if score_answer else None,
    )
    record = {
        "id": sample.id,
        "task": task.name,
        "policy": policy.describe(),
        "prediction": out.text,
        "answers": sample.answers,
        "score": task.score(out.text, sample),
    }
    if score_answer:
        record |= {"gold": gold, "answer_logprob": out.answer.logprob, "answer_tokens": out.answer.tokens,
                   "answer_nll": out.answer.mean_nll}
    return record | summarise(out.stats).to_record()


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def record_setting(model, sample: Sample, policy: Policy, *, delay: int, chunk_size: int | None,
                   question_agnostic: bool) -> dict:
    """What a sample's record depends on besides the code: resuming reuses a record only when this matches.

    The model is named by its hub id or its directory's name (not the machine's path), the prompt and the
    policy (options, and weights for a NAMM: :meth:`Policy.fingerprint`) by short SHA-1 digests.
    """
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    if Path(name).is_absolute():
        name = Path(name).name
    prompt = json.dumps([sample.context, sample.question]) if question_agnostic else sample.prompt
    return {"model": name, "prompt": _digest(prompt), "policy": _digest(policy.fingerprint()), "delay": delay,
            "chunk_size": chunk_size, "question_agnostic": question_agnostic,
            "max_new_tokens": sample.max_new_tokens}


def _check_resumable(record: dict, setting: dict, out_file: Path) -> None:
    """Raise when a recorded sample was made with another setting (records without one predate the check)."""
    recorded = record.get("setting")
    if recorded is None or recorded == setting:
        return
    diff = ", ".join(f"{k} {recorded.get(k)!r} -> {setting.get(k)!r}" for k in setting if recorded.get(k) != setting[k])
    raise NammError(
        f"{out_file} already holds sample {record['id']} made with another setting ({diff}). Use another --out "
        "directory for this setting, or delete the file to compute it again."
    )


def read_records(path: Path) -> list[dict]:
    """Every valid record of a results file; unreadable lines are set aside (see :func:`namm.jsonl.read_records`)."""
    found = jsonl.read_records(path)
    if found.message:
        say(found.message)
    return found.records


def evaluate(
    model, tokenizer, task: Task, policy: Policy | Callable[[Sample], Policy], samples: Sequence[Sample], *,
    out_file: Path | None = None, delay: int = 512, chunk_size: int | None = None,
    question_agnostic: bool = False, progress: bool = True, label: str | None = None,
) -> list[dict]:
    """Evaluate a policy (or a per-sample policy factory) on samples; resumable through ``out_file``.

    Every recorded sample is checked against its setting before anything runs, and the number of records
    reused is reported on stderr.
    """
    if out_file:
        jsonl.writable_dir(out_file.parent)
    done = {r["id"]: r for r in read_records(out_file) if "id" in r} if out_file else {}
    plan = []
    for sample in samples:
        pol = policy(sample) if callable(policy) and not isinstance(policy, Policy) else policy
        setting = record_setting(model, sample, pol, delay=delay, chunk_size=chunk_size,
                                 question_agnostic=question_agnostic)
        if sample.id in done:
            _check_resumable(done[sample.id], setting, out_file)
        plan.append((sample, pol, setting))
    reused = sum(sample.id in done for sample in samples)
    if reused:
        say(f"resuming {out_file}: {reused} of {plural(len(samples), 'sample')} already recorded, reused")
    records = []
    with progress_bar(disable=not progress) as bar:
        job = bar.add_task(label or task.name, total=len(samples))
        for sample, pol, setting in plan:
            if sample.id in done:
                records.append(done[sample.id])
                bar.advance(job)
                continue
            record = run_sample(model, tokenizer, task, sample, pol, delay=delay, chunk_size=chunk_size,
                                question_agnostic=question_agnostic)
            record["setting"] = setting
            if out_file:
                jsonl.append_record(out_file, record)
            records.append(record)
            bar.advance(job)
    return records


#: ``--match-budget`` modes -> (label suffix, budget column): per memory step (fair) and the paper's single
#: mean budget.
MATCH_MODES = {
    "namm": ("@namm-steps", "matched to namm, per step"),
    "namm-mean": ("@namm", "matched to namm (mean)"),
}


@dataclass
class Entry:
    """One row of a comparison: a policy at one budget, over the shared samples."""

    label: str
    policy: str
    budget: str
    records: list[dict]

    def summary(self, full: dict[str, float]) -> dict:
        if not self.records:
            raise NammError(f"{self.label}: no samples to summarise.")
        scores = [r["score"] for r in self.records]
        ref = [full[r["id"]] for r in self.records]
        mean, ref_mean = statistics.fmean(scores), statistics.fmean(ref)
        return {
            "label": self.label,
            "policy": self.policy,
            "budget": self.budget,
            "score": 100 * mean,
            "relative": mean / ref_mean if ref_mean > 0 else float("nan"),
            "mean_kv_tokens": statistics.fmean(r["mean_kv_tokens"] for r in self.records),
            "cache_fraction": statistics.fmean(r["cache_fraction"] for r in self.records),
            "peak_kv_tokens": max(r["peak_kv_tokens"] for r in self.records),
            "peak_kv_mib": max(r.get("peak_kv_bytes", 0) for r in self.records) / 2**20,
            "seconds": statistics.fmean(r["seconds"] for r in self.records),
            "samples": len(self.records),
        }


def compare(
    model, tokenizer, task: Task, samples: Sequence[Sample], policies: Sequence[str], budgets: Sequence[int | float],
    out_dir: Path, *, match_budget: str | None = None, namm_policy: Policy | None = None, delay: int = 512,
    chunk_size: int | None = None, question_agnostic: bool = False, progress: bool = True,
) -> list[dict]:
    """Run ``policies`` on the same samples; write per-run JSON lines, ``results.json`` and ``results.png``.

    Baselines run at every budget in ``budgets``. With ``match_budget="namm"`` they instead get, sample by
    sample and memory step by memory step, the cache size the NAMM kept at that step (a
    :class:`BudgetSchedule`), so both hold the same number of tokens per head after every step. With
    ``"namm-mean"`` they get the paper's rule: one fixed budget per sample, the NAMM's mean size after its
    steps (a fixed budget bites from the first step on, so the baseline ends with less cache than the
    NAMM when the NAMM's cache grows over the prompt). Scores are reported absolute (x100) and relative to
    the full cache on the same samples.
    """
    names, budgets = check_compare(policies, budgets, match_budget, namm_policy)
    if match_budget is None:  # a token budget above a sample's context is refused before anything runs
        for sample in samples:
            n = count_tokens(tokenizer, sample.prompt) + sample.max_new_tokens
            for name in names:
                if name not in ("full", "namm"):
                    for budget in budgets:
                        make_policy(name, budget=budget).validate(n)
    jsonl.writable_dir(out_dir)
    common = dict(delay=delay, chunk_size=chunk_size, question_agnostic=question_agnostic, progress=progress)
    entries: list[Entry] = []

    def run(label: str, policy, budget: str) -> Entry:
        file = out_dir / f"{task.name}__{label}.jsonl"
        records = evaluate(model, tokenizer, task, policy, samples, out_file=file, label=label, **common)
        entry = Entry(label, label.split("@")[0], budget, records)
        entries.append(entry)
        return entry

    full = run("full", Full(), "100%")
    namm_entry = run("namm", namm_policy, "learned") if "namm" in names else None
    baselines = [n for n in names if n not in ("full", "namm")]
    if match_budget is not None and baselines:  # the same per-sample budgets for every baseline
        matched = {r["id"]: matched_budget(r, match_budget) for r in namm_entry.records}
    for name in baselines:
        if match_budget is not None:

            def factory(sample, name=name):
                budget = matched[sample.id]
                return Full() if budget is None else make_policy(name, budget=budget)

            suffix, budget_text = MATCH_MODES[match_budget]
            run(f"{name}{suffix}", factory, budget_text)
        else:
            for budget in budgets:
                label = f"{name}@{budget}"
                run(label, make_policy(name, budget=budget), budget_label(budget))
    reference = {r["id"]: r["score"] for r in full.records}
    summary = [e.summary(reference) for e in entries]
    atomic_write_text(out_dir / f"{task.name}__results.json", json.dumps(
        {"task": task.name, "samples": [s.id for s in samples], "delay": delay, "results": summary}, indent=2
    ))
    plot_comparison(summary, out_dir / f"{task.name}__results.png",
                    title=f"{task.name} ({plural(len(samples), 'sample')})")
    return summary


def check_compare(policies: Sequence[str], budgets: Sequence[int | float], match_budget: str | None,
                  namm_policy: Policy | None) -> tuple[list[str], list[int | float]]:
    """Check a comparison's settings before anything runs; returns the policy names (``full`` first, registry
    spelling) and the budgets without repeats (``0.25`` and ``25%`` are one budget).

    Raises:
        NammError: an unknown policy, a bad budget, an unknown ``match_budget`` mode, ``namm`` without a
            policy, a mode without ``namm``, or baselines with neither budgets nor a mode.
    """
    if match_budget not in (None, *MATCH_MODES):
        raise NammError(f"--match-budget must be one of {', '.join(MATCH_MODES)}, got {match_budget!r}.")
    names: list[str] = []
    for p in policies:
        name = "namm" if p.strip().lower() == "namm" else make_policy(p).name  # unknown names refused here
        if name not in names:
            names.append(name)
    if "full" not in names:
        names = ["full", *names]
    if "namm" in names and namm_policy is None:
        raise NammError("compare: the namm policy needs a checkpoint (--namm-checkpoint).")
    if match_budget is not None and "namm" not in names:
        raise NammError(f"--match-budget {match_budget} needs namm among --policies.")
    unique: list[int | float] = []
    for budget in budgets:  # 1 (a token) and 1.0 (100%) differ although they compare equal
        if (type(budget), budget) not in [(type(u), u) for u in unique]:
            unique.append(budget)
    baselines = [n for n in names if n not in ("full", "namm")]
    if match_budget is None and baselines:
        if not unique:
            raise NammError("compare: give the baselines at least one --budget (or use --match-budget).")
        for name in baselines:
            for budget in unique:
                make_policy(name, budget=budget)  # a bad budget is refused here, before the full cache runs
    return names, unique


def plot_comparison(summary: list[dict], path: Path, title: str) -> None:
    """Score against mean cache fraction: one curve (over budgets) or point per policy."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    by_policy: dict[str, list[dict]] = {}
    for row in summary:
        by_policy.setdefault(row["policy"], []).append(row)
    for policy, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r["cache_fraction"])
        style = "*" if policy in ("namm", "full") else "o-"
        ax.plot([r["cache_fraction"] for r in rows], [r["score"] for r in rows], style, label=policy, markersize=9)
    ax.set_xlabel("mean KV cache / full cache")
    ax.set_ylabel("score (x100)")
    ax.set_xlim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)
