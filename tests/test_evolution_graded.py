"""The graded fitness (teacher-forced answer likelihood), the search subspace and CSA, on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

import namm
from conftest import random_prompt, tiny_model, word_tokenizer
from namm.errors import NammError
from namm.evolution import evolve
from namm.evolution.lm import (
    LMEvaluator,
    checkpoint_writer,
    graded_score,
    margin_score,
    prepare_normalisation,
    soft_greedy_prefix,
)
from namm.evolution.optimizer import CMAES
from namm.evolution.population import generate_copies
from namm.evolution.recipe import Recipe
from namm.evolution.subspace import Subspace
from namm.memory import NAMMConfig, param_count
from namm.policies import Full, StreamingLLM
from namm.scoring import gold_answer
from test_evolution_lm import first_word_task  # noqa: F401 - fixture

BUDGET_POLICY = {"selection": "per_head", "hop": 4, "n_fft": 8, "delay": 32, "budget": 0.5, "depth_knots": 2,
                 "spectral_norm": "per_head", "key_norm_feature": True}
RECIPE = {
    "model": "tiny",
    "policy": BUDGET_POLICY,
    "seed": 0,
    "population": 6,
    "samples_per_task": 2,
    "delay": 32,
    "chunk_size": 16,
    "diagonal": True,
    "members_per_batch": 3,
    "metric": "likelihood",
    "csa": True,
    "search": {"groups": ["head_weight", "depth_logits"], "start": {"depth_logits": [0.5, -0.5]}},
    "stages": [{"name": "s1", "generations": 3, "tasks": [{"name": "first_word_test"}]}],
    "validation": {"every": 1, "samples": 2, "tasks": [{"name": "first_word_test"}]},
}


def test_answer_logprob_under_eviction_matches_copies_and_differs_from_full(tokenizer):
    model = tiny_model("qwen2")
    prompt, answer = random_prompt(90, seed=6), " w4 w5"
    policy = StreamingLLM(budget=12)
    run = lambda pol, copies=1: generate_copies(model, tokenizer, prompt, pol, copies, max_new_tokens=0,  # noqa: E731
                                                delay=32, chunk_size=16, answer=answer)
    one, many, full = run(policy), run(policy, 3), run(Full())
    assert [a.logprob for a in many.answer] == pytest.approx([one.answer.logprob] * 3, abs=1e-4)
    assert one.answer.tokens == 2 and one.answer.logprob != pytest.approx(full.answer.logprob, abs=1e-3)


def test_graded_score_is_one_for_the_full_cache_and_orders_losses():
    assert graded_score(np.array([-3.0]), -3.0, 2)[0] == 1.0
    assert graded_score(np.array([-1.0]), -3.0, 2)[0] == 1.0  # better than full: capped at 1
    near, lost = graded_score(np.array([-5.0, -30.0]), -3.0, 2)
    assert 1.0 > near > lost > 0.0


def test_margins_say_what_greedy_decoding_reproduces(tokenizer):
    model = tiny_model("llama")
    prompt = random_prompt(60, seed=3)
    greedy = namm.generate(model, tokenizer, prompt, Full(), max_new_tokens=3, delay=32, chunk_size=16)
    scored = namm.generate(model, tokenizer, prompt, Full(), max_new_tokens=0, delay=32, chunk_size=16,
                           answer=greedy.text)
    a = scored.answer
    assert len(a.margins) == a.tokens == 3 and a.greedy_prefix == 3 and min(a.margins) > 0
    other = " w1" if not greedy.text.startswith(" w1") else " w2"
    wrong = namm.generate(model, tokenizer, prompt, Full(), max_new_tokens=0, delay=32, chunk_size=16,
                          answer=other + greedy.text).answer
    assert wrong.margins[0] < 0 and wrong.greedy_prefix == 0
    # log p(gold) from the same logits: logprob <= 0, and a positive margin means p(gold) > p(any other token)
    assert a.logprob < 0


def test_margin_score_is_one_for_the_full_cache_and_a_lost_first_token_costs_the_answer():
    full = np.array([4.0, 5.0, 6.0])
    assert margin_score(full[None], full).tolist() == [1.0]
    assert margin_score(np.array([[6.0, 8.0, 9.0]]), full)[0] == 1.0  # better than full: capped at 1
    first_lost, last_lost, near = margin_score(np.array([[-3.0, 5.0, 6.0], [4.0, 5.0, -3.0], [1.0, 5.0, 6.0]]), full)
    assert first_lost < 0.1 < last_lost < near < 1.0
    assert soft_greedy_prefix(np.array([50.0, 50.0, -50.0, 50.0])) == pytest.approx(0.5)
    with pytest.raises(NammError, match="no tokens"):
        soft_greedy_prefix(np.zeros(0))


@pytest.mark.parametrize("metric, stored_file, answer_tokens", [
    ("likelihood", "full_logprob.json", lambda entry: entry[1]),  # [logprob, tokens]
    ("margin", "full_margins.json", len),  # one margin per answer token
])
def test_graded_fitness_of_full_against_itself_is_exactly_one(tmp_path, first_word_task, metric,  # noqa: F811
                                                               stored_file, answer_tokens):
    recipe = Recipe.from_dict({**RECIPE, "metric": metric})
    ev = LMEvaluator(recipe, tmp_path, model=tiny_model("llama"), tokenizer=word_tokenizer())
    ids = ev.sample_pool("first_word_test", "train")[:3]
    assert ev.full_scores("first_word_test", ids).tolist() == [1.0, 1.0, 1.0]
    # a member keeping everything (budget 1.0) has exactly the full cache's answer scores
    ev.policy.budget = 1.0
    res = ev.evaluate(ev.initial_params()[None].repeat(2, 0), "first_word_test", ids)
    assert res.scores.tolist() == [[1.0] * 3] * 2
    stored = json.loads((tmp_path / stored_file).read_text())
    assert len(stored) == 3 and all(answer_tokens(entry) == 1 for entry in stored.values())
    ev.policy.budget = 0.2  # a real eviction scores in [0, 1]
    res = ev.evaluate(ev.initial_params()[None], "first_word_test", ids)
    assert ((res.scores >= 0) & (res.scores <= 1)).all()


def test_subspace_embeds_and_starts_where_asked():
    cfg = NAMMConfig(**BUDGET_POLICY)
    sub = Subspace(cfg, ["depth_logits", "head_weight"], {"depth_logits": [1.0, 2.0]})
    assert sub.groups == ["head_weight", "depth_logits"] and sub.dim == cfg.feature_dim + 2
    assert sub.initial()[-2:].tolist() == [1.0, 2.0]
    full = sub.embed(np.ones((2, sub.dim)))
    assert full.shape == (2, param_count(cfg)) and full.sum() == 2 * sub.dim
    assert full[0, -2:].tolist() == [1.0, 1.0]
    with pytest.raises(NammError, match="unknown parameter group"):
        Subspace(cfg, ["qkv_weights"])
    with pytest.raises(NammError, match="expected 2 finite values"):
        Subspace(cfg, None, {"depth_logits": [1.0]})


def test_csa_is_set_and_survives_a_save(tmp_path):
    opt = CMAES(400, 8, seed=1, diagonal=True, csa=True)
    assert "CSA" in type(opt._es.adapt_sigma).__name__
    default = CMAES(400, 8, seed=1, diagonal=True)
    assert "CSA" not in type(default._es.adapt_sigma).__name__  # pycma's own choice above 300 dimensions
    opt.tell(opt.ask(), np.arange(8.0))
    opt.save(tmp_path)
    loaded, _ = CMAES.load(tmp_path)
    assert loaded.config["csa"] and "CSA" in type(loaded._es.adapt_sigma).__name__
    assert np.array_equal(loaded.ask(), opt.ask())


class Crash(RuntimeError):
    pass


def _run(recipe, path, crash_after: int | None = None):
    r = Recipe.from_dict(recipe)
    ev = LMEvaluator(r, path, model=tiny_model("llama"), tokenizer=word_tokenizer())
    if crash_after is not None:  # the evaluator dies in the middle of a generation
        calls, inner = [0], ev.evaluate

        def evaluate(*args):
            calls[0] += 1
            if calls[0] > crash_after:
                raise Crash
            return inner(*args)

        ev.evaluate = evaluate
    return evolve(r, path, (path / "optimizer.json").exists(), lambda: ev, progress=False,
                  prepare=lambda p: prepare_normalisation(r, p, samples_per_task=2, evaluator=ev),
                  save_checkpoint=checkpoint_writer(r, path))


def test_graded_subspace_run_resumes_exactly(tmp_path, first_word_task):  # noqa: F811
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(RECIPE, whole)
    with pytest.raises(Crash):
        _run(RECIPE, split, crash_after=3)  # generation 1 and its validation, then death inside generation 2
    _run(RECIPE, split)
    a = [json.loads(x) for x in (whole / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["best"] for r in a] == [r["best"] for r in b] and len(a) == 3
    assert all(0.0 < r["best"] <= 1.0 for r in a)
    m1, _ = CMAES.load(whole)
    m2, _ = CMAES.load(split)
    assert m1.n_params == NAMMConfig(**BUDGET_POLICY).feature_dim + 2
    assert np.array_equal(m1.mean, m2.mean)
    # per-head standardisation reads no global statistics: none were gathered (no full-cache runs for them)
    assert namm.NAMM.from_pretrained(whole / "normalisation").normaliser.count == 0
    best = namm.NAMM.from_pretrained(whole / "checkpoints" / "latest")
    assert best.active_budget == 0.5 and best.config.depth_knots == 2
    sub = Subspace.from_recipe(best.config, RECIPE["search"])
    assert np.allclose(best.get_params().numpy()[sub.index], m1.mean, atol=1e-6)


class _NeedleRule(StreamingLLM):
    """Recency, with the needle's tokens forced in (or out) of the cache."""

    name = "needle_rule_test"

    def __init__(self, budget, span, keep_needle):
        super().__init__(budget=budget)
        self.span, self.keep_needle = span, keep_needle

    def score(self, step):
        scores = super().score(step)
        lo, hi = self.span
        needle = (step.positions >= lo) & (step.positions < hi)
        return scores.masked_fill(needle, float("inf") if self.keep_needle else float("-inf"))


@pytest.mark.integration
def test_graded_score_ranks_a_kept_needle_above_an_evicted_one(smollm2):
    """Constructed case on SmolLM2: the same cache size, the passkey's tokens kept or evicted."""
    from namm.tasks import get_task

    model, tok = smollm2
    task = get_task("passkey")
    sample = task.samples(1, seed=4321, length=512, tokenizer=tok)[0]
    needle = sample.meta["needles"][0]
    span = (needle["token_index"], needle["token_end"])
    answer = gold_answer(sample, task)
    run = lambda policy: namm.generate(model, tok, sample.prompt, policy, max_new_tokens=0, delay=128,  # noqa: E731
                                       chunk_size=128, answer=answer)
    full = run(Full())
    kept, lost = (run(_NeedleRule(0.3, span, keep)) for keep in (True, False))
    tokens = full.answer.tokens
    s_kept = graded_score(np.array([kept.answer.logprob]), full.answer.logprob, tokens)[0]
    s_lost = graded_score(np.array([lost.answer.logprob]), full.answer.logprob, tokens)[0]
    assert kept.stats.cache_fraction == pytest.approx(lost.stats.cache_fraction, abs=0.01)
    assert s_kept > 0.5 > s_lost, (s_kept, s_lost)
    m_kept, m_lost = (margin_score(np.array([r.answer.margins]), np.array(full.answer.margins))[0]
                      for r in (kept, lost))
    assert m_kept > 0.5 > m_lost, (m_kept, m_lost)
