"""The memories shipped inside the package for SmolLM2 (the NAMM, and the scorer distilled from KVzip): they load, and
on a fixed 2k passkey set they keep at most 55% of the cache and answer at least as many as StreamingLLM at the same
size."""

from __future__ import annotations

import statistics

import pytest

import namm
from namm.harness import evaluate
from namm.memory import bundled_checkpoints
from namm.policies import Distilled, DistilledScorer, Full, StreamingLLM
from namm.tasks import get_task

pytestmark = pytest.mark.integration

SHIPPED = "smollm2-135m"


def test_the_smollm2_namm_is_bundled_and_loads():
    assert SHIPPED in bundled_checkpoints()
    policy = namm.NAMM.from_pretrained(SHIPPED)
    assert policy.active_budget == 0.5 and policy.config.reconstruction_feature and policy.config.head_sharing
    assert policy.get_params().abs().sum() > 0, "the shipped NAMM must score tokens, not be the zero start"
    assert policy.request.probe


def test_the_shipped_distilled_scorer_fits_smollm2():
    scorer = DistilledScorer.load(Distilled.scorer)
    assert Distilled.shipped() and scorer.meta["model"] == SHIPPED
    assert tuple(scorer.weight.shape) == (30, 3, 64 + 32) and scorer.hidden_weight is None
    assert not Distilled().request.probe and not Distilled().request.attention


def test_the_shipped_memories_keep_at_most_55_percent_and_beat_streaming_on_passkey(smollm2):
    """The NAMM, and the scorer distilled from KVzip (no probe), on the same samples."""
    model, tok = smollm2
    policy = namm.NAMM.from_pretrained(SHIPPED)
    task = get_task("passkey")
    # Seed 4242 is used by no fit, selection or benchmark of the shipped memory.
    samples = task.samples(4, seed=4242, length=2048, tokenizer=tok)
    delay = policy.config.delay
    runs = {name: evaluate(model, tok, task, p, samples, delay=delay, chunk_size=delay, progress=False)
            for name, p in (("full", Full()), ("namm", policy), ("streaming", StreamingLLM(budget=0.5)),
                            ("distilled", Distilled(budget=0.5)))}
    score = {name: statistics.fmean(r["score"] for r in rs) for name, rs in runs.items()}
    cache = {name: statistics.fmean(r["cache_fraction"] for r in rs) for name, rs in runs.items()}
    assert score["full"] > 0.5, "Full must solve this passkey set, or the comparison says nothing"
    assert cache["namm"] <= 0.55 and abs(cache["namm"] - cache["streaming"]) < 0.01
    assert score["namm"] >= score["streaming"]
    assert cache["distilled"] <= 0.55 and score["distilled"] >= score["streaming"]
