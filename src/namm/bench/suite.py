"""Benchmark suites: a YAML file naming tasks x lengths x samples x seeds, policies x budgets, the mode, the cadence.

Format (every key but ``tasks`` and ``policies`` optional)::

    name: quick                       # default: the file's stem
    model: smollm2-135m               # default model (``namm bench --model`` overrides it)
    mode: prompt                      # prompt (question in the prompt) | question-agnostic (kvpress's setting)
    delay: 512                        # memory step every DELAY tokens
    chunk_size: null                  # prefill chunk (default: DELAY, for Full too, so costs compare)
    seeds: [7000]                     # task seeds (none of them used by training or selection)
    budgets: [0.25, 0.5]              # default budgets of the budgeted policies
    baselines: [streaming, h2o, l2, snapkv]   # the paired comparison is against the best of these per budget
    bootstrap: {resamples: 2000, seed: 0, level: 0.95}
    tasks:
      - task: passkey                 # a name of namm.tasks.list_tasks()
        lengths: [2048]               # synthetic: prompt length; LongBench: the truncation limit
        samples: 32                   # or "all" (LongBench: every sample of the data)
        seeds: [7000]                 # overrides the suite's seeds
        options: {haystack: noise}    # get_task options
    policies:
      - full                          # always run (the reference), listed or not
      - streaming                     # a name: runs at the suite's budgets
      - {name: snapkv, budgets: [0.25, 0.5, 256], options: {window: 32}}
      - {name: namm, checkpoint: smollm2-135m}          # learned: the checkpoint's own cache size (or budget)
      - {name: namm, budgets: [0.25, 0.5], label: namm}  # a budgeted NAMM: each head keeps its top scores
      - {name: h2o, budgets: [namm]}  # "namm": the NAMM's cache size after each of its memory steps, per sample
      - {name: streaming, allocation: smollm2-135m, label: streaming+depth}  # a NAMM checkpoint's learned depth
                                      # allocation given to a classic scorer (what the scorer adds beyond it)

A budget is a token count (``256``), a fraction (``0.25`` or ``"25%"``), ``namm`` (matched to the suite's NAMM
per memory step, :class:`~namm.policies.BudgetSchedule`) or ``namm-mean`` (its mean size, the paper's rule).
Bad suites raise :class:`~namm.errors.NammError` with one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from namm.errors import NammError

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
MODES = ("prompt", "question-agnostic")
MATCHED = ("namm", "namm-mean")
_TOP_KEYS = {"name", "description", "model", "mode", "delay", "chunk_size", "seeds", "budgets", "baselines",
             "bootstrap", "tasks", "policies"}
_TASK_KEYS = {"task", "lengths", "samples", "seeds", "options"}
_POLICY_KEYS = {"name", "budgets", "options", "checkpoint", "label", "allocation"}


@dataclass(frozen=True)
class TaskSpec:
    """One task entry: ``samples`` per (length, seed) group; ``samples=None`` means every sample (LongBench)."""

    task: str
    lengths: tuple[int | None, ...]
    samples: int | None
    seeds: tuple[int, ...]
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One policy at one budget: a column of the leaderboard. ``budget`` is ``None`` for Full and for a NAMM at
    its checkpoint's own setting (its threshold, or the budget it was evolved with)."""

    label: str
    policy: str
    budget: int | float | str | None
    options: dict = field(default_factory=dict)
    checkpoint: str | None = None
    #: A NAMM checkpoint whose learned depth allocation this (classic, budgeted) cell's budget follows.
    allocation: str | None = None

    @property
    def name(self) -> str:
        """The label without its budget (``namm-evolved`` for ``namm-evolved@0.5``): what a table row is called."""
        return self.label.split("@", 1)[0]

    @property
    def budget_text(self) -> str:
        b = self.budget
        if b is None:
            return "100%" if self.policy == "full" else "learned"
        if isinstance(b, str):
            return {"namm": "= namm, per step", "namm-mean": "= namm (mean)"}[b]
        return f"{b:.0%}" if isinstance(b, float) else f"{b} tokens"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    model: str
    mode: str
    delay: int
    chunk_size: int
    tasks: tuple[TaskSpec, ...]
    cells: tuple[Cell, ...]
    baselines: tuple[str, ...]
    bootstrap: dict
    path: Path | None = None

    @property
    def question_agnostic(self) -> bool:
        return self.mode == "question-agnostic"


def _fail(where: str, message: str) -> NammError:
    return NammError(f"{where}: {message}")


def parse_budget(value: Any, where: str) -> int | float | str:
    """A suite budget: token count, fraction, ``"25%"``, ``namm`` or ``namm-mean``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in MATCHED:
            return text
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else (float(text) if "." in text else int(text))
        except ValueError:
            raise _fail(where, f"budget {value!r} is not a token count, a fraction, 'namm' or 'namm-mean'.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"budget {value!r} is not a token count, a fraction, 'namm' or 'namm-mean'.")
    if isinstance(value, float) and not 0 < value <= 1:
        raise _fail(where, f"a fractional budget must be in (0, 1], got {value}.")
    if isinstance(value, int) and value < 1:
        raise _fail(where, f"a token budget must be at least 1, got {value}.")
    return value


def _label(name: str, budget: int | float | str | None) -> str:
    if budget is None:
        return name
    if budget == "namm":
        return f"{name}@namm-steps"
    if budget == "namm-mean":
        return f"{name}@namm"
    return f"{name}@{budget}"


def _int_list(value: Any, where: str, allow_none: bool = False) -> tuple:
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if v is None and allow_none:
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _fail(where, f"expected non-negative integers, got {value!r}.")
        else:
            out.append(v)
    if not out:
        raise _fail(where, "the list is empty.")
    return tuple(out)


def resolve_suite(name_or_path: str | Path) -> Path:
    """A suite file: a path, or the name of a shipped suite (``quick``, ``standard``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SUITES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
    raise NammError(f"--suite {name_or_path}: no such file, and no shipped suite of that name (shipped: {names}).")


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and check a suite file (see the module docstring for the format)."""
    path = resolve_suite(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise NammError(f"{path}: not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise NammError(f"{path}: a suite is a mapping with at least 'tasks' and 'policies'.")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(str(path), f"unknown key(s) {unknown}; the keys are {sorted(_TOP_KEYS)}.")
    for key in ("tasks", "policies"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise _fail(str(path), f"'{key}' must be a non-empty list.")
    mode = str(data.get("mode", "prompt"))
    if mode not in MODES:
        raise _fail(str(path), f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    delay = data.get("delay", 512)
    chunk = data.get("chunk_size") or delay
    if not isinstance(delay, int) or delay < 1 or not isinstance(chunk, int) or chunk < 1 or delay % chunk:
        raise _fail(str(path), f"delay must be a positive integer and chunk_size a divisor of it ({delay}, {chunk}).")
    seeds = _int_list(data.get("seeds", [7000]), f"{path}: seeds")
    default_budgets = [parse_budget(b, f"{path}: budgets") for b in data.get("budgets", [0.25, 0.5])]
    tasks = tuple(_task(entry, i, seeds, path) for i, entry in enumerate(data["tasks"]))
    cells = _cells(data["policies"], default_budgets, path)
    baselines = tuple(str(b).lower() for b in data.get("baselines", ["streaming", "h2o", "l2", "snapkv"]))
    boot = {"resamples": 2000, "seed": 0, "level": 0.95} | dict(data.get("bootstrap") or {})
    if set(boot) != {"resamples", "seed", "level"}:
        raise _fail(str(path), "bootstrap takes resamples, seed and level.")
    return Suite(name=str(data.get("name", path.stem)), description=str(data.get("description", "")).strip(),
                 model=str(data.get("model", "smollm2-135m")), mode=mode, delay=delay, chunk_size=chunk, tasks=tasks,
                 cells=cells, baselines=baselines, bootstrap=boot, path=path)


def _task(entry: Any, i: int, seeds: tuple[int, ...], path: Path) -> TaskSpec:
    where = f"{path}: tasks[{i}]"
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or "task" not in entry:
        raise _fail(where, "each task is a name or a mapping with 'task'.")
    unknown = sorted(set(entry) - _TASK_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; a task takes {sorted(_TASK_KEYS)}.")
    samples = entry.get("samples", 8)
    if samples == "all":
        samples = None
    elif isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise _fail(where, f"samples must be a positive integer or 'all', got {samples!r}.")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise _fail(where, "options must be a mapping.")
    lengths = _int_list(entry.get("lengths", [None]), f"{where}: lengths", allow_none=True)
    task_seeds = _int_list(entry["seeds"], f"{where}: seeds") if "seeds" in entry else seeds
    return TaskSpec(str(entry["task"]), lengths, samples, task_seeds, dict(options))


def _cells(entries: list, default_budgets: list, path: Path) -> tuple[Cell, ...]:
    from namm.policies import POLICIES  # noqa: PLC0415

    cells: dict[str, Cell] = {"full": Cell("full", "full", None)}
    names = []
    for i, entry in enumerate(entries):
        where = f"{path}: policies[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise _fail(where, "each policy is a name or a mapping with 'name'.")
        unknown = sorted(set(entry) - _POLICY_KEYS)
        if unknown:
            raise _fail(where, f"unknown key(s) {unknown}; a policy takes {sorted(_POLICY_KEYS)}.")
        name = str(entry["name"]).lower()
        if name not in POLICIES and name != "namm":
            raise _fail(where, f"unknown policy {name!r}; choose one of: {', '.join(sorted([*POLICIES, 'namm']))}.")
        options = dict(entry.get("options") or {})
        names.append(name)
        if name == "full":
            continue
        if "allocation" in entry and name == "namm":
            raise _fail(where, "'allocation' gives a classic policy a NAMM's depth allocation; a NAMM has its own.")
        if name == "namm":
            checkpoint = str(entry.get("checkpoint", "smollm2-135m"))
            label = str(entry.get("label", "namm"))
            if "budgets" not in entry:
                if label in cells:
                    raise _fail(where, f"{label} is listed twice.")
                cells[label] = Cell(label, "namm", None, options, checkpoint)
                continue
            budgets = entry["budgets"] if isinstance(entry["budgets"], list) else [entry["budgets"]]
            for budget in (parse_budget(b, where) for b in budgets):
                if isinstance(budget, str):
                    raise _fail(where, "a NAMM's budget is a token count or a fraction, not one matched to a NAMM.")
                cell_label = _label(label, budget)
                if cell_label in cells:
                    raise _fail(where, f"{cell_label} is listed twice.")
                cells[cell_label] = Cell(cell_label, "namm", budget, options, checkpoint)
            continue
        budgets = entry.get("budgets", default_budgets)
        budgets = [parse_budget(b, where) for b in (budgets if isinstance(budgets, list) else [budgets])]
        allocation = entry.get("allocation")
        if allocation is not None and (not isinstance(allocation, str) or not allocation):
            raise _fail(where, f"allocation must name a NAMM checkpoint (bundled name or folder), got {allocation!r}.")
        if allocation is not None and any(isinstance(b, str) for b in budgets):
            raise _fail(where, "a depth allocation spreads a token count or a fraction, not a budget matched to NAMM.")
        for budget in budgets:
            label = _label(str(entry.get("label", name)), budget)
            if label in cells:
                raise _fail(where, f"{label} is listed twice.")
            cells[label] = Cell(label, name, budget, options, allocation=allocation)
    matched = [c for c in cells.values() if isinstance(c.budget, str)]
    if matched and not ("namm" in cells and cells["namm"].budget is None):
        raise _fail(str(path), f"{matched[0].label} is matched to a NAMM, but the suite has no unbudgeted 'namm' cell.")
    # The reference first, then the NAMM (matched budgets need its records), then the listed order.
    order = sorted(cells.values(), key=lambda c: (c.policy != "full", c.policy != "namm"))
    return tuple(order)
