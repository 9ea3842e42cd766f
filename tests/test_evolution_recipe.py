"""Recipe schema: parsing, defaults, round trip and clear errors naming the bad field."""

from __future__ import annotations

import copy

import pytest
import yaml

from namm.errors import NammError
from namm.evolution import Recipe, TaskSpec, load_recipe

GOOD = {
    "model": "smollm2-135m",
    "policy": {"hidden": 32, "bias": True},
    "seed": 4,
    "population": 8,
    "samples_per_task": 2,
    "diagonal": True,
    "delay": 256,
    "chunk_size": 64,
    "cache_weight": 0.1,
    "members_per_batch": 4,
    "backend": "ray",
    "ray": {"address": "auto", "num_workers": 2},
    "stages": [
        {"name": "one", "generations": 3, "tasks": [{"name": "passkey", "options": {"length": 2048, "depth": 0.5}}]},
        {"name": "two", "generations": 2, "tasks": ["passkey", {"name": "qa"}]},
    ],
    "validation": {"every": 2, "samples": 5, "seed": 9, "tasks": ["qa"]},
}


def test_load_roundtrip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    r = load_recipe(path)
    assert r.model == "smollm2-135m" and r.population == 8 and r.diagonal and r.backend == "ray"
    assert r.ray.num_workers == 2 and r.ray.address == "auto" and r.ray.num_gpus_per_worker == 0.0
    assert [s.name for s in r.stages] == ["one", "two"] and r.total_generations == 5
    assert r.stages[0].tasks[0] == TaskSpec("passkey", {"length": 2048, "depth": 0.5})
    assert r.stages[1].tasks[0] == TaskSpec("passkey", {})
    assert r.validation.tasks[0].name == "qa" and r.validation_seed == 9
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_defaults():
    r = Recipe.from_dict({"model": "m", "stages": [{"name": "s", "generations": 1, "tasks": ["t"]}]})
    assert (r.population, r.samples_per_task, r.sigma0, r.seed) == (32, 64, 0.065, 0)
    assert (r.delay, r.chunk_size, r.cache_weight, r.members_per_batch) == (512, 128, 0.0, 1)
    assert r.backend == "local" and not r.diagonal and r.validation is None and r.policy == {}
    assert (r.device, r.dtype) == ("cpu", "float32")


def test_device_and_dtype_pass_through_and_a_missing_gpu_is_one_line(monkeypatch):
    import torch

    from namm.evolution.recipe import check_recipe, recipe_device

    base = {**GOOD, "backend": "local", "policy": {}, "validation": None,
            "stages": [{"name": "one", "generations": 1, "tasks": ["passkey"]}]}
    r = Recipe.from_dict({**base, "device": "cuda:1", "dtype": "bfloat16"})
    assert (r.device, r.dtype) == ("cuda:1", "bfloat16") and Recipe.from_dict(r.to_dict()) == r
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipe_device(Recipe.from_dict({**base, "device": "auto"})) == "cpu"
    with pytest.raises(NammError, match="'device': 'cuda:1', but torch sees no CUDA device"):
        check_recipe(r)  # before any run directory exists
    check_recipe(Recipe.from_dict({**base, "device": "cuda", "backend": "ray"}))  # Ray's workers may have GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert recipe_device(Recipe.from_dict({**base, "device": "auto"})) == "cuda"
    assert recipe_device(Recipe.from_dict({**base, "device": "cuda:0"})) == "cuda:0"
    with pytest.raises(NammError, match="sees 1 CUDA device"):
        recipe_device(r)


def test_task_key_roundtrip():
    t = TaskSpec("needle", {"length": 4096, "depth": 0.25})
    assert t.key == 'needle:{"depth":0.25,"length":4096}'
    assert TaskSpec.from_key(t.key) == t
    assert TaskSpec("qa").key == "qa" and TaskSpec.from_key("qa") == TaskSpec("qa")


_DELETE = object()


def _with(path: str, value):
    data = copy.deepcopy(GOOD)
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model", _DELETE, "'model' is required"),
        ("model", 3, "'model'"),
        ("population", 1, "'population'"),
        ("population", 4.5, "'population'"),
        ("samples_per_task", True, "'samples_per_task'"),
        ("sigma0", -1, "'sigma0'"),
        ("diagonal", "yes", "'diagonal'"),
        ("backend", "slurm", "'backend'"),
        ("cache_weight", -0.5, "'cache_weight'"),
        ("members_per_batch", 9, "'members_per_batch'"),
        ("policy", [1, 2], "'policy'"),
        ("popsize", 8, "'popsize' is unknown"),
        ("stages", [], "'stages'"),
        ("stages.0.generations", 0, "'stages[0].generations'"),
        ("stages.1.name", "one", "stage names must be unique"),
        ("stages.0.tasks", [], "'stages[0].tasks'"),
        ("stages.0.tasks.0.options", {"length": float("nan")}, "'stages[0].tasks[0].options'"),
        ("stages.0.tasks.0.name", "a:b", "'stages[0].tasks[0].name'"),
        ("stages.1.tasks", ["qa", "qa"], "listed twice"),
        ("stages.0.extra", 1, "'stages[0].extra' is unknown"),
        ("ray.num_workers", 0, "'ray.num_workers'"),
        ("ray.adress", "x", "'ray.adress' is unknown"),
        ("validation.every", 0, "'validation.every'"),
        ("validation.seed", 4, "'validation.seed'"),
        ("validation.tasks", [], "'validation.tasks'"),
        ("device", "gpu", "'device'"),
        ("device", "cuda:x", "'device'"),
        ("dtype", "int8", "'dtype'"),
    ],
)
def test_bad_recipes_name_the_field(path, value, message):
    with pytest.raises(NammError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Recipe.from_dict(_with(path, value))


def test_bad_files(tmp_path):
    with pytest.raises(NammError, match="Cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(NammError, match="not valid YAML"):
        load_recipe(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(NammError, match=r"list.yaml: the recipe: expected a mapping"):
        load_recipe(notmap)


def test_population_minimum_is_the_optimisers():
    import numpy as np

    from namm.evolution import CMAES

    with pytest.raises(NammError, match="'population': expected an integer >= 3, got 2"):
        Recipe.from_dict({**GOOD, "population": 2, "members_per_batch": 1})
    assert Recipe.from_dict({**GOOD, "population": 3, "members_per_batch": 1}).population == 3
    opt = CMAES(5, 3)  # the smallest population pycma runs
    for _ in range(2):
        x = opt.ask()
        opt.tell(x, -np.sum(x**2, axis=1))
    with pytest.raises(NammError, match="popsize must be >= 3"):
        CMAES(5, 2)


def test_cadence_fields_must_agree():
    with pytest.raises(NammError, match="'chunk_size': must divide delay \\(256\\)"):
        Recipe.from_dict({**GOOD, "chunk_size": 100})
    with pytest.raises(NammError, match="'policy.delay': 128 differs from delay \\(256\\)"):
        Recipe.from_dict({**GOOD, "policy": {"delay": 128}})
    assert Recipe.from_dict({**GOOD, "policy": {"delay": 256}}).policy == {"delay": 256}


def test_check_recipe_knows_the_tasks_and_the_namm():
    from namm.evolution.recipe import check_recipe

    ok = {**GOOD, "policy": {}, "stages": [{"name": "one", "generations": 1, "tasks": ["passkey"]}],
          "validation": {"every": 1, "seed": 9, "tasks": [{"name": "niah_single", "options": {"length": 512}}]}}
    check_recipe(Recipe.from_dict(ok))
    with pytest.raises(NammError, match="'stages\\[1\\].tasks\\[1\\]': Unknown task 'qa'"):
        check_recipe(Recipe.from_dict({**GOOD, "policy": {}}))
    bad_option = {**ok, "validation": {"every": 1, "seed": 9, "tasks": [{"name": "niah_single", "options": {"x": 1}}]}}
    with pytest.raises(NammError, match="'validation.tasks\\[0\\]': Task 'niah_single' does not take option"):
        check_recipe(Recipe.from_dict(bad_option))
    with pytest.raises(NammError, match="recipe field 'policy': Unknown NAMM config field"):
        check_recipe(Recipe.from_dict({**ok, "policy": {"hidden": 32}}))


def test_every_bundled_recipe_parses_and_checks():
    from pathlib import Path

    import namm
    from namm.evolution.recipe import check_recipe

    folder = Path(namm.__file__).parent / "recipes"
    recipes = sorted(folder.glob("*.yaml"))
    assert len(recipes) >= 7
    for path in recipes:
        recipe = load_recipe(path)
        if recipe.backend == "local" and recipe.device in ("cpu", "auto"):
            check_recipe(recipe)
