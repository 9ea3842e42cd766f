"""End to end: a 2-generation NAMM evolution on a tiny random model, every file written, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

import namm
from conftest import random_prompt, tiny_model, word_tokenizer
from namm.evolution import evolve
from namm.evolution.lm import LMEvaluator, checkpoint_writer, prepare_normalisation
from namm.evolution.recipe import Recipe
from namm.tasks import Sample, Task, register


class FirstWordTask(Task):
    """The answer is the prompt's first word (found far back in the context)."""

    name = "first_word_test"
    metric_name = "contains"
    max_new_tokens = 3

    def samples(self, n, *, seed=0, length=None, tokenizer=None, depth=None, offset=0):
        out = []
        for i in range(offset, offset + n):
            p = random_prompt(length or 80, seed=seed * 100_000 + i)
            out.append(Sample(f"{seed}-{i}", self.name, p, [p.split()[0]], self.max_new_tokens))
        return out

    def score(self, prediction, sample):
        return float(sample.answers[0] in prediction.split())


@pytest.fixture
def first_word_task():
    """Registers the test task for one test only (the registry is global)."""
    from namm.tasks import base

    register("first_word_test", lambda **kw: FirstWordTask())
    yield
    base._REGISTRY.pop("first_word_test", None)
    base._GROUP.pop("first_word_test", None)

RECIPE = {
    "model": "tiny",
    "policy": {"selection": "per_head"},
    "seed": 0,
    "population": 4,
    "samples_per_task": 2,
    "delay": 32,
    "chunk_size": 16,
    "diagonal": True,
    "cache_weight": 0.1,
    "members_per_batch": 4,
    "stages": [{"name": "s1", "generations": 2, "tasks": [{"name": "first_word_test"}]}],
    "validation": {"every": 1, "samples": 2, "tasks": [{"name": "first_word_test"}]},
}


def test_two_generations_end_to_end(tmp_path, first_word_task):
    recipe = Recipe.from_dict(RECIPE)
    ev = LMEvaluator(recipe, tmp_path, model=tiny_model("llama"), tokenizer=word_tokenizer())
    result = evolve(recipe, tmp_path, False, lambda: ev, progress=False,
                    prepare=lambda p: prepare_normalisation(recipe, p, samples_per_task=2, evaluator=ev),
                    save_checkpoint=checkpoint_writer(recipe, tmp_path))
    assert result.generations == 2
    for name in ["recipe.yaml", "optimizer.json", "log.jsonl", "full_scores.json",
                 "fitness.png", "normalisation/config.json"]:
        assert (tmp_path / name).exists(), name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("cache" in json.dumps(entry) for entry in log)
    best = namm.NAMM.from_pretrained(tmp_path / "checkpoints" / "best")
    assert best.normaliser.frozen and best.normaliser.count > 0
    assert best.n_params == 4172 and np.isfinite(best.get_params().numpy()).all()
    assert result.best_generation is not None
