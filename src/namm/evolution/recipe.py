"""The evolution recipe: a YAML file describing one NAMM training run, parsed into validated dataclasses.

Example::

    model: smollm2-135m
    policy: {hidden: 32}          # overrides of the NAMM policy configuration
    seed: 0
    population: 32                # CMA-ES lambda; mu = population // 2
    samples_per_task: 64          # samples drawn per training task and generation, shared by all members
    sigma0: 0.065
    diagonal: false               # true: separable CMA-ES (diagonal covariance)
    delay: 512                    # memory step every `delay` tokens
    chunk_size: 128               # prefill chunk length
    cache_weight: 0.0             # > 0 subtracts cache_weight * mean kept-cache fraction from the fitness
    members_per_batch: 1          # population members evaluated by one forward pass
    metric: task                  # or "likelihood": graded fitness from the gold answer's teacher-forced
                                  # log-likelihood relative to the full cache (no decoding); or "margin":
                                  # its soft greedy prefix from per-token logit margins (aligned with decoding)
    search: {groups: [head_weight, depth_logits], start: {head_weight: [...]}}   # optional subspace
    csa: false                    # true: cumulative step-size adaptation (the reference's) at any dimension
    device: cpu                   # torch device of the model ("cuda", "cuda:1", "mps"; "auto": cuda when present)
    dtype: float32                # model dtype (float32, bfloat16, float16)
    train_pool: 0                 # > 0: training samples per task (a finite pool, so replay recordings are reused)
    replay_recompute: 0           # > 0: score training samples by replay (namm.evolution.replay), recomputing at
                                  #      least this many of the prompt's last tokens; validation stays exact
    backend: local                # or "ray"
    ray: {address: null, num_workers: 2, num_cpus_per_worker: 1, num_gpus_per_worker: 0}
    stages:
      - name: stage1
        generations: 100
        tasks:
          - {name: passkey, options: {length: 4096, depth: 0.5}}
    validation:                   # optional; the mean is scored on these every `every` generations
      every: 10
      samples: 32                 # per task, from the tasks' validation pools (null = whole pool)
      seed: 1                     # seed of the validation subset (must differ from `seed`)
      tasks:
        - {name: passkey, options: {length: 4096}}

Every error is a :class:`~namm.errors.NammError` naming the offending field, e.g. ``stages[0].generations``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from namm.errors import NammError

BACKENDS = ("local", "ray")
METRICS = ("task", "likelihood", "margin")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE = re.compile(r"cpu|auto|mps|cuda(:\d+)?")
#: the smallest population pycma's CMA-ES accepts (2 fails inside pycma)
MIN_POPULATION = 3


@dataclass
class TaskSpec:
    """A task and its options; :attr:`key` is the string the evaluators, logs and score caches use."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``name``, or ``name:`` + the options as compact sorted JSON (inverted by :meth:`from_key`)."""
        if not self.options:
            return self.name
        return f"{self.name}:{json.dumps(self.options, sort_keys=True, separators=(',', ':'))}"

    @classmethod
    def from_key(cls, key: str) -> TaskSpec:
        """Inverse of :attr:`key`."""
        name, sep, opts = key.partition(":")
        return cls(name, json.loads(opts) if sep else {})


@dataclass
class Stage:
    """One incremental stage: ``generations`` generations on ``tasks``; the optimiser state carries over."""

    name: str
    tasks: list[TaskSpec]
    generations: int


@dataclass
class ValidationConfig:
    """Held-out scoring of the CMA-ES mean, on the tasks' validation pools (disjoint from training)."""

    tasks: list[TaskSpec]
    every: int = 10
    samples: int | None = None
    seed: int | None = None


@dataclass
class RayConfig:
    """Ray backend options (``address`` None starts or joins a local Ray instance)."""

    address: str | None = None
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0


@dataclass
class Recipe:
    """A validated evolution recipe (see the module docstring for the YAML form)."""

    model: str
    stages: list[Stage]
    policy: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    population: int = 32
    samples_per_task: int = 64
    sigma0: float = 0.065
    diagonal: bool = False
    delay: int = 512
    chunk_size: int = 128
    cache_weight: float = 0.0
    members_per_batch: int = 1
    backend: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    validation: ValidationConfig | None = None
    metric: str = "task"
    search: dict[str, Any] = field(default_factory=dict)
    csa: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    train_pool: int = 0
    replay_recompute: int = 0

    @property
    def total_generations(self) -> int:
        return sum(s.generations for s in self.stages)

    @property
    def validation_seed(self) -> int:
        """The validation subset's seed (``validation.seed``, default ``seed + 1``)."""
        v = self.validation
        return self.seed + 1 if v is None or v.seed is None else v.seed

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-able); ``Recipe.from_dict(r.to_dict()) == r``."""
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Parse and validate; raises :class:`NammError` naming the bad field."""
        f = _Fields(data, "recipe")
        stages = [_stage(s, f"stages[{i}]") for i, s in enumerate(f.seq("stages", required=True))]
        if not stages:
            raise NammError("recipe field 'stages': at least one stage is required.")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise NammError(f"recipe field 'stages': stage names must be unique, got {names}.")
        recipe = cls(
            model=f.text("model", required=True),
            stages=stages,
            policy=f.json_dict("policy"),
            seed=f.integer("seed", 0, minimum=0),
            population=f.integer("population", 32, minimum=MIN_POPULATION),
            samples_per_task=f.integer("samples_per_task", 64, minimum=1),
            sigma0=f.number("sigma0", 0.065, positive=True),
            diagonal=f.flag("diagonal", False),
            delay=f.integer("delay", 512, minimum=1),
            chunk_size=f.integer("chunk_size", 128, minimum=1),
            cache_weight=f.number("cache_weight", 0.0),
            members_per_batch=f.integer("members_per_batch", 1, minimum=1),
            backend=f.text("backend", "local"),
            ray=_ray(f.get("ray", {})),
            validation=_validation(f.get("validation", None)),
            metric=f.text("metric", "task"),
            search=f.json_dict("search"),
            csa=f.flag("csa", False),
            device=f.text("device", "cpu"),
            dtype=f.text("dtype", "float32"),
            train_pool=f.integer("train_pool", 0, minimum=0),
            replay_recompute=f.integer("replay_recompute", 0, minimum=0),
        )
        f.finish()
        if recipe.dtype not in DTYPES:
            raise NammError(f"recipe field 'dtype': must be one of {list(DTYPES)}, got {recipe.dtype!r}.")
        if not DEVICE.fullmatch(recipe.device):
            raise NammError(f"recipe field 'device': must be cpu, cuda, cuda:N, mps or auto, got {recipe.device!r}.")
        if recipe.metric not in METRICS:
            raise NammError(f"recipe field 'metric': must be one of {list(METRICS)}, got {recipe.metric!r}.")
        unknown = sorted(set(recipe.search) - {"groups", "start"})
        if unknown:
            raise NammError(f"recipe field 'search.{unknown[0]}' is unknown (search has 'groups' and 'start').")
        if recipe.backend not in BACKENDS:
            raise NammError(f"recipe field 'backend': must be one of {list(BACKENDS)}, got {recipe.backend!r}.")
        if recipe.cache_weight < 0:
            raise NammError(f"recipe field 'cache_weight': must be >= 0 (0 = off), got {recipe.cache_weight}.")
        if recipe.delay % recipe.chunk_size:
            raise NammError(
                f"recipe field 'chunk_size': must divide delay ({recipe.delay}) so memory steps land on chunk "
                f"ends, got {recipe.chunk_size}."
            )
        if "delay" in recipe.policy and recipe.policy["delay"] != recipe.delay:
            raise NammError(
                f"recipe field 'policy.delay': {recipe.policy['delay']!r} differs from delay ({recipe.delay}), the "
                "cadence the NAMM is evolved at; give one value (or drop policy.delay)."
            )
        if recipe.members_per_batch > recipe.population:
            raise NammError(
                f"recipe field 'members_per_batch': {recipe.members_per_batch} exceeds population {recipe.population}."
            )
        if recipe.replay_recompute and recipe.metric != "margin":
            raise NammError(f"recipe field 'replay_recompute': replay scores the gold answer's margins; set metric: "
                            f"margin (got {recipe.metric!r}).")
        if recipe.validation is not None and recipe.validation_seed == recipe.seed:
            raise NammError(f"recipe field 'validation.seed': must differ from the training seed {recipe.seed}.")
        return recipe


def recipe_device(recipe: Recipe) -> str:
    """The torch device the recipe's model runs on (``auto``: ``cuda`` when torch sees a GPU, else ``cpu``); a
    one-line error when it asks for a GPU that torch does not see."""
    import torch  # noqa: PLC0415 - the recipe itself does not need torch

    if recipe.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if recipe.device.startswith("cuda"):
        index = int(recipe.device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise NammError(f"recipe field 'device': {recipe.device!r}, but torch sees "
                            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s) here; "
                            "use device: cpu (or auto).")
    if recipe.device == "mps" and not torch.backends.mps.is_available():
        raise NammError("recipe field 'device': 'mps', but torch sees no Apple GPU here; use device: cpu (or auto).")
    return recipe.device


def check_recipe(recipe: Recipe) -> None:
    """Check what :meth:`Recipe.from_dict` cannot without the task registry and the NAMM: every task name and
    its options, and the ``policy`` overrides. Run it before a run directory is created (``namm evolve``
    does), so a mistake never leaves a half-started run behind.

    Raises:
        NammError: naming the field, e.g. ``stages[0].tasks[1]``.
    """
    from namm.memory import NAMMConfig  # noqa: PLC0415 - imports torch; the recipe itself does not need it
    from namm.tasks import get_task  # noqa: PLC0415

    specs = [(f"stages[{i}].tasks[{j}]", t) for i, s in enumerate(recipe.stages) for j, t in enumerate(s.tasks)]
    if recipe.validation is not None:
        specs += [(f"validation.tasks[{j}]", t) for j, t in enumerate(recipe.validation.tasks)]
    for where, spec in specs:
        try:
            get_task(spec.name, **spec.options)
        except (NammError, TypeError, ValueError) as e:
            raise NammError(f"recipe field '{where}': {e}") from None
    try:
        NAMMConfig.from_dict({**NAMMConfig().to_dict(), "delay": recipe.delay, **recipe.policy})
    except (NammError, TypeError, ValueError) as e:
        raise NammError(f"recipe field 'policy': {e}") from None
    if recipe.backend == "local":  # Ray's workers may have GPUs that this process does not see
        recipe_device(recipe)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise NammError(f"Cannot read recipe {path}: {e}") from e
    except yaml.YAMLError as e:
        raise NammError(f"Recipe {path} is not valid YAML: {e}") from e
    try:
        return Recipe.from_dict(data)
    except NammError as e:
        raise NammError(f"{path}: {e}") from e


# --------------------------------------------------------------------------------------------- parsing helpers
def _stage(data: Any, where: str) -> Stage:
    f = _Fields(data, where)
    tasks = [_task(t, f"{where}.tasks[{i}]") for i, t in enumerate(f.seq("tasks", required=True))]
    if not tasks:
        raise NammError(f"recipe field '{where}.tasks': at least one task is required.")
    _unique_keys(tasks, f"{where}.tasks")
    stage = Stage(
        name=f.text("name", required=True), tasks=tasks, generations=f.integer("generations", None, minimum=1)
    )
    f.finish()
    return stage


def _task(data: Any, where: str) -> TaskSpec:
    if isinstance(data, str):
        data = {"name": data}
    f = _Fields(data, where)
    task = TaskSpec(name=f.text("name", required=True), options=f.json_dict("options"))
    f.finish()
    if ":" in task.name:
        raise NammError(f"recipe field '{where}.name': task names cannot contain ':', got {task.name!r}.")
    return task


def _unique_keys(tasks: list[TaskSpec], where: str) -> None:
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise NammError(f"recipe field '{where}': the same task (name and options) is listed twice: {keys}.")


def _ray(data: Any) -> RayConfig:
    f = _Fields(data, "ray")
    address = f.get("address", None)
    if address is not None and not isinstance(address, str):
        raise NammError(f"recipe field 'ray.address': expected a string or null, got {address!r}.")
    cfg = RayConfig(
        address=address,
        num_workers=f.integer("num_workers", 1, minimum=1),
        num_cpus_per_worker=f.number("num_cpus_per_worker", 1.0, nonnegative=True),
        num_gpus_per_worker=f.number("num_gpus_per_worker", 0.0, nonnegative=True),
    )
    f.finish()
    return cfg


def _validation(data: Any) -> ValidationConfig | None:
    if data is None:
        return None
    f = _Fields(data, "validation")
    tasks = [_task(t, f"validation.tasks[{i}]") for i, t in enumerate(f.seq("tasks", required=True))]
    if not tasks:
        raise NammError("recipe field 'validation.tasks': at least one task is required.")
    _unique_keys(tasks, "validation.tasks")
    samples = f.get("samples", None)
    seed = f.get("seed", None)
    cfg = ValidationConfig(
        tasks=tasks,
        every=f.integer("every", 10, minimum=1),
        samples=None if samples is None else f.integer("samples", None, minimum=1),
        seed=None if seed is None else f.integer("seed", None, minimum=0),
    )
    f.finish()
    return cfg


class _Fields:
    """Typed access to one mapping of the recipe; :meth:`finish` rejects keys nobody asked for."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            what = "the recipe" if where == "recipe" else f"recipe field '{where}'"
            raise NammError(f"{what}: expected a mapping, got {type(data).__name__} {data!r}.")
        self.data, self.where, self.used = data, where, set()

    def _name(self, key: str) -> str:
        return key if self.where == "recipe" else f"{self.where}.{key}"

    def _bad(self, key: str, what: str, value: Any) -> NammError:
        return NammError(f"recipe field '{self._name(key)}': expected {what}, got {value!r}.")

    def get(self, key: str, default: Any, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise NammError(f"recipe field '{self._name(key)}' is required.")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, required: bool = False) -> str:
        v = self.get(key, default, required)
        if not isinstance(v, str) or not v.strip():
            raise self._bad(key, "a non-empty string", v)
        return v

    def integer(self, key: str, default: int | None, minimum: int | None = None) -> int:
        v = self.get(key, default, required=default is None)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer", v)
        if minimum is not None and v < minimum:
            raise self._bad(key, f"an integer >= {minimum}", v)
        return v

    def number(self, key: str, default: float, positive: bool = False, nonnegative: bool = False) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(key, "a finite number", v)
        if (positive and v <= 0) or (nonnegative and v < 0):
            raise self._bad(key, "a number > 0" if positive else "a number >= 0", v)
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def seq(self, key: str, required: bool = False) -> list:
        v = self.get(key, [], required)
        if not isinstance(v, list):
            raise self._bad(key, "a list", v)
        return v

    def json_dict(self, key: str) -> dict[str, Any]:
        v = self.get(key, {})
        if v is None:
            v = {}
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise self._bad(key, "a mapping with string keys", v)
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise self._bad(key, f"plain values (numbers, strings, booleans, lists, mappings): {e}", v) from e
        return dict(v)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used, key=str)
        if unknown:
            raise NammError(f"recipe field '{self._name(str(unknown[0]))}' is unknown (unknown keys: {unknown}).")
