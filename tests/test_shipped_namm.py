"""The NAMM shipped inside the package for SmolLM2: it loads, and on a fixed passkey set it keeps less
cache than Full without losing a single answer."""

from __future__ import annotations

import statistics

import pytest

import namm
from namm.harness import evaluate
from namm.memory import bundled_checkpoints
from namm.policies import Full
from namm.tasks import get_task

pytestmark = pytest.mark.integration

SHIPPED = "smollm2-135m"


def test_the_smollm2_namm_is_bundled_and_loads():
    assert SHIPPED in bundled_checkpoints()
    policy = namm.NAMM.from_pretrained(SHIPPED)
    assert policy.n_params == 4172
    assert policy.get_params().abs().sum() > 0, "the shipped NAMM must be evolved, not the zero (keep-all) start"
    assert policy.normaliser.frozen


def test_the_shipped_namm_keeps_less_cache_than_full_with_no_loss_on_passkey(smollm2):
    model, tok = smollm2
    policy = namm.NAMM.from_pretrained(SHIPPED)
    task = get_task("passkey")
    # Seed 4242 is neither the training seed (0) nor the validation seed (1000) of the recipe.
    samples = task.samples(6, seed=4242, length=1024, tokenizer=tok)
    delay = policy.config.delay
    full = evaluate(model, tok, task, Full(), samples, delay=delay, chunk_size=128, progress=False)
    ours = evaluate(model, tok, task, policy, samples, delay=delay, chunk_size=128, progress=False)
    full_score = statistics.fmean(r["score"] for r in full)
    our_score = statistics.fmean(r["score"] for r in ours)
    our_cache = statistics.fmean(r["cache_fraction"] for r in ours)
    assert full_score > 0.5, "Full must solve this passkey set, or the comparison says nothing"
    assert our_score >= full_score
    assert our_cache < 0.99 * statistics.fmean(r["cache_fraction"] for r in full)
