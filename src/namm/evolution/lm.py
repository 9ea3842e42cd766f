"""The language-model evaluator: scores NAMM parameter vectors by generating answers to task samples.

* Samples are identified by ids: ``t<i>`` (training pool) and ``v<i>`` (validation pool). Synthetic tasks
  generate sample ``i`` of the pool from the recipe's seed (training) or the validation seed, so pools are
  unbounded and reproducible; file-based tasks (LongBench) split their rows deterministically, one row in
  four going to validation.
* ``evaluate`` runs each sample once per batch of ``members_per_batch`` population members: one batch row
  per member (``NAMM.set_population``), the prefix before the first memory step computed once and shared
  (:func:`namm.evolution.population.generate_copies`).
* ``metric: likelihood`` (the graded fitness): a member's score on a sample is
  ``exp(-max(0, (full log-likelihood - member log-likelihood) / answer tokens))`` of the gold answer,
  teacher-forced after the prompt (no decoding): 1 when the member's cache predicts the answer as well as
  the full cache, about 0.05 when it loses a needle, in between for a near miss. Every sample's score is in
  ``(0, 1]``, so one sample cannot dominate; the full cache scores exactly 1. The full-cache
  log-likelihoods are computed once and kept in ``full_logprob.json``.
* ``metric: margin`` (the graded fitness aligned with greedy decoding): a member's score on a sample is its
  soft greedy prefix (:func:`soft_greedy_prefix`: the mean over answer tokens of the product of
  ``sigmoid(margin / tau)`` up to that token, where a token's margin is its logit minus the best other logit)
  relative to the full cache's, capped at 1. Measured reason (docs/evolution.md): under ``likelihood``, an
  L2 cache with a recent window kept the passkey's mean answer NLL within 0.1-0.6 nats of an oracle cache
  (graded score about 0.7) while greedy decoding answered " the pass key" on 8 of 8 samples; the first token
  decides, and a mean over tokens hides it. Full-cache margins are kept in ``full_margins.json``.
* ``search`` (a :class:`~namm.evolution.subspace.Subspace`): CMA-ES sees only the searched coordinates;
  the evaluator and the checkpoints embed them into the full vector.
* ``prepare_normalisation`` (the loop's ``prepare`` hook) gathers the 17 spectrogram features' statistics
  on full-cache runs of training samples, freezes them and stores them in ``run_dir/normalisation/``, as
  the reference does at its first, zero-parameter evaluation; every checkpoint carries them.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from namm.atomic import atomic_fill_dir, atomic_write_json
from namm.errors import NammError
from namm.evolution.evaluator import EvalResult
from namm.evolution.population import generate_copies
from namm.evolution.recipe import Recipe, TaskSpec, recipe_device
from namm.evolution.subspace import Subspace
from namm.memory import NAMM, NAMMConfig
from namm.policies import Full
from namm.scoring import gold_answer
from namm.tasks import LongBenchTask, Sample, Task, get_task

SYNTHETIC_POOL = 100_000
NORMALISATION_DIR = "normalisation"
FULL_LOGPROB_FILE = "full_logprob.json"
FULL_MARGINS_FILE = "full_margins.json"
#: Temperature (nats) of the soft greedy prefix: a margin of 3 nats counts 0.95, 0 counts 0.5, -3 counts 0.05.
MARGIN_TAU = 1.0


def graded_score(member_logprob: np.ndarray, full_logprob: np.ndarray | float, tokens: int) -> np.ndarray:
    """``exp(-max(0, (full - member) / tokens))``: 1 at the full cache's likelihood or better, in ``(0, 1]``."""
    loss = (np.asarray(full_logprob, dtype=np.float64) - np.asarray(member_logprob, dtype=np.float64)) / tokens
    return np.exp(-np.clip(loss, 0.0, None))


def soft_greedy_prefix(margins: np.ndarray, tau: float = MARGIN_TAU) -> np.ndarray:
    """``(..., A)`` per-token margins (nats) -> ``(...)`` soft fraction of the answer greedy decoding reproduces.

    ``mean_i prod_{j <= i} sigmoid(margin_j / tau)``: close to the fraction of leading tokens with a positive
    margin, so a lost first token costs the whole answer, as it does when decoding; continuous in the margins,
    so near misses still rank above lost needles.
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.shape[-1] == 0:
        raise NammError("soft_greedy_prefix: the answer has no tokens.")
    accept = 0.5 * (1.0 + np.tanh(m / (2.0 * tau)))  # sigmoid(m / tau), without overflow
    return np.cumprod(accept, axis=-1).mean(axis=-1)


def margin_score(member_margins: np.ndarray, full_margins: np.ndarray) -> np.ndarray:
    """``(P, A)`` members' margins and ``(A,)`` the full cache's -> ``(P,)`` scores in ``[0, 1]``: the member's
    soft greedy prefix relative to the full cache's, capped at 1 (the full cache scores exactly 1)."""
    full = soft_greedy_prefix(full_margins)
    return np.minimum(1.0, soft_greedy_prefix(member_margins) / max(float(full), 1e-12))


def recipe_subspace(recipe: Recipe, policy: NAMM) -> Subspace | None:
    """The recipe's search subspace for this NAMM, or ``None`` when it searches every parameter."""
    return Subspace.from_recipe(policy.config, recipe.search) if recipe.search else None


def recipe_namm(recipe: Recipe, run_dir: str | Path | None = None) -> NAMM:
    """A zero-parameter NAMM with the recipe's configuration overrides and, once ``prepare_normalisation``
    has stored them in ``run_dir``, the run's frozen normalisation statistics."""
    try:
        # the checkpoint's cadence is the one it is evolved at (users' default --delay)
        config = NAMMConfig.from_dict({**NAMMConfig().to_dict(), "delay": recipe.delay, **recipe.policy})
    except TypeError as err:
        raise NammError(f"recipe.policy: {err}") from err
    policy = NAMM(config)
    norm = Path(run_dir) / NORMALISATION_DIR if run_dir is not None else None
    if norm is not None and norm.exists():
        policy.normaliser = NAMM.from_pretrained(norm).normaliser
    return policy


class LMEvaluator:
    """An :class:`~namm.evolution.evaluator.Evaluator` backed by a transformers model."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, model=None, tokenizer=None):
        from namm.models import load_model  # noqa: PLC0415

        self.recipe = recipe
        self.run_dir = Path(run_dir)
        if model is None:
            model, tokenizer = load_model(recipe.model, dtype=recipe.dtype, device=recipe_device(recipe))
        self.model, self.tokenizer = model, tokenizer
        self.policy = recipe_namm(recipe, self.run_dir)
        self.subspace = recipe_subspace(recipe, self.policy)
        self._tasks: dict[str, Task] = {}
        self._samples: dict[tuple[str, str], Sample] = {}
        self._full_logprob_path = self.run_dir / FULL_LOGPROB_FILE
        self._full_logprob: dict[str, list[float | int]] = {}  # "task/sample id" -> [logprob (nats), tokens]
        if self._full_logprob_path.exists():
            self._full_logprob = json.loads(self._full_logprob_path.read_text())
        self._full_margins_path = self.run_dir / FULL_MARGINS_FILE
        self._full_margins: dict[str, list[float]] = {}  # "task/sample id" -> per-token margins (nats)
        if self._full_margins_path.exists():
            self._full_margins = json.loads(self._full_margins_path.read_text())

    # --- pools and samples -------------------------------------------------------------------------
    def task(self, key: str) -> Task:
        if key not in self._tasks:
            spec = TaskSpec.from_key(key)
            self._tasks[key] = get_task(spec.name, **spec.options)
        return self._tasks[key]

    def initial_params(self) -> np.ndarray:
        if self.subspace is not None:
            return self.subspace.initial()
        return self.policy.get_params().double().numpy()

    def full_params(self, params: np.ndarray) -> np.ndarray:
        """What CMA-ES searches -> the NAMM's full parameter vectors (identity without a subspace)."""
        return params if self.subspace is None else self.subspace.embed(params)

    def sample_pool(self, task: str, split: str) -> list[str]:
        t = self.task(task)
        prefix = "t" if split == "train" else "v"
        limit = self.recipe.train_pool if split == "train" and self.recipe.train_pool else None
        if not isinstance(t, LongBenchTask):  # generated from a seed: unbounded pools
            return [f"{prefix}{i}" for i in range(limit or SYNTHETIC_POOL)]
        rows = t.samples(10**9, seed=0, tokenizer=self.tokenizer)
        is_val = [zlib.crc32(s.id.encode()) % 4 == 0 for s in rows]
        return [f"{prefix}{i}" for i, s in enumerate(rows) if is_val[i] == (split != "train")][:limit]

    def sample(self, task: str, sample_id: str) -> Sample:
        key = (task, sample_id)
        if key not in self._samples:
            t = self.task(task)
            index = int(sample_id[1:])
            seed = self.recipe.seed if sample_id[0] == "t" else self.recipe.validation_seed
            if isinstance(t, LongBenchTask):
                seed = 0
            self._samples[key] = t.samples(1, seed=seed, offset=index, tokenizer=self.tokenizer)[0]
        return self._samples[key]

    # --- scoring --------------------------------------------------------------------------------------
    def _run(self, task: str, sample_id: str, policy, copies: int = 1):
        sample = self.sample(task, sample_id)
        out = generate_copies(self.model, self.tokenizer, sample.prompt, policy, copies,
                              max_new_tokens=sample.max_new_tokens, delay=self.recipe.delay,
                              chunk_size=self.recipe.chunk_size)
        texts = out.text if copies > 1 else [out.text]
        t = self.task(task)
        return [t.score(text, sample) for text in texts], out.stats

    def _logprob(self, task: str, sample_id: str, policy, copies: int = 1):
        """Teacher-forced log-likelihood of the gold answer, per row, and the run's statistics."""
        sample = self.sample(task, sample_id)
        cont = gold_answer(sample, self.task(task))
        out = generate_copies(self.model, self.tokenizer, sample.prompt, policy, copies, max_new_tokens=0,
                              delay=self.recipe.delay, chunk_size=self.recipe.chunk_size, answer=cont)
        scores = out.answer if isinstance(out.answer, list) else [out.answer]
        return scores, out.stats

    def full_margins(self, task: str, sample_id: str) -> np.ndarray:
        """``(A,)`` the full cache's per-token gold-answer margins (computed once, kept on disk)."""
        key = f"{task}/{sample_id}"
        if key not in self._full_margins:
            answers, _ = self._logprob(task, sample_id, Full())
            self._full_margins[key] = list(answers[0].margins)
            atomic_write_json(self._full_margins_path, self._full_margins)
        return np.array(self._full_margins[key], dtype=np.float64)

    def full_logprob(self, task: str, sample_id: str) -> tuple[float, int]:
        """The full cache's gold-answer log-likelihood and its token count (computed once, kept on disk)."""
        key = f"{task}/{sample_id}"
        if key not in self._full_logprob:
            answers, _ = self._logprob(task, sample_id, Full())
            self._full_logprob[key] = [float(answers[0].logprob), int(answers[0].tokens)]
            atomic_write_json(self._full_logprob_path, self._full_logprob)
        lp, tokens = self._full_logprob[key]
        return float(lp), int(tokens)

    def graded(self, sample_id: str) -> bool:
        """Whether a sample is scored by a graded metric: training samples under ``metric: likelihood`` or
        ``margin`` (validation always uses the task metric, with decoding)."""
        return self.recipe.metric in ("likelihood", "margin") and sample_id.startswith("t")

    def full_scores(self, task: str, sample_ids: list[str]) -> np.ndarray:
        out = []
        for s in sample_ids:
            if self.graded(s):
                self._full_reference(task, s)
                out.append(1.0)  # graded scores are relative to the full cache: exactly 1 for it
            else:
                out.append(self._run(task, s, Full())[0][0])
        return np.array(out)

    def _full_reference(self, task: str, sample_id: str):
        """What the recipe's graded metric compares a member with: the full cache's margins (``margin``) or its
        log-likelihood and answer token count (``likelihood``); computed once, kept on disk."""
        if self.recipe.metric == "margin":
            return self.full_margins(task, sample_id)
        return self.full_logprob(task, sample_id)

    def _member_scores(self, task: str, sample_id: str, copies: int):
        if not self.graded(sample_id):
            return self._run(task, sample_id, self.policy, copies=copies)
        full = self._full_reference(task, sample_id)
        answers, stats = self._logprob(task, sample_id, self.policy, copies=copies)
        if self.recipe.metric == "margin":
            return margin_score(np.array([a.margins for a in answers]), full), stats
        return graded_score(np.array([a.logprob for a in answers]), *full), stats

    def evaluate(self, params: np.ndarray, task: str, sample_ids: list[str]) -> EvalResult:
        start = time.perf_counter()
        params = self.full_params(np.atleast_2d(params))
        scores = np.zeros((len(params), len(sample_ids)))
        fraction = np.zeros_like(scores)
        step = max(1, self.recipe.members_per_batch)
        for j, sid in enumerate(sample_ids):
            for lo in range(0, len(params), step):
                rows = params[lo : lo + step]
                self.policy.set_population(torch.as_tensor(rows, dtype=torch.float32))
                try:
                    s, stats = self._member_scores(task, sid, copies=len(rows))
                finally:
                    self.policy.clear_population()
                scores[lo : lo + len(rows), j] = s
                fraction[lo : lo + len(rows), j] = stats.row_cache_fraction
        return EvalResult(scores, np.clip(fraction, 0.0, None), time.perf_counter() - start)


@dataclass
class LMEvaluatorFactory:
    """Picklable recipe for building an :class:`LMEvaluator` (one per Ray worker)."""

    recipe: dict
    run_dir: str

    def __call__(self) -> LMEvaluator:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        return make_evaluator(Recipe.from_dict(self.recipe), self.run_dir)


def make_evaluator(recipe: Recipe, run_dir: str | Path, model=None, tokenizer=None) -> LMEvaluator:
    """The recipe's evaluator: exact (:class:`LMEvaluator`), or replay for training samples
    (:class:`~namm.evolution.replay.ReplayEvaluator`) when ``replay_recompute`` is set."""
    if recipe.replay_recompute:
        from namm.evolution.replay import ReplayEvaluator  # noqa: PLC0415 - replay imports this module

        return ReplayEvaluator(recipe, run_dir, model, tokenizer)
    return LMEvaluator(recipe, run_dir, model, tokenizer)


def prepare_normalisation(recipe: Recipe, run_dir: Path, samples_per_task: int = 8, evaluator=None) -> None:
    """Gather the spectrogram-feature statistics on full-cache runs of training samples; freeze and save.

    With ``spectral_norm: per_head`` the features are standardised per head and step and the statistics are
    never read: nothing is run, and ``normalisation/`` holds the identity statistics (count 0).
    """
    policy = recipe_namm(recipe)
    if policy.config.spectral_norm == "per_head":
        atomic_fill_dir(run_dir / NORMALISATION_DIR, policy.save_pretrained)
        return
    ev = evaluator or LMEvaluator(recipe, run_dir)
    policy.collect_stats = True
    for stage in recipe.stages[:1]:
        for spec in stage.tasks:
            for sid in ev.sample_pool(spec.key, "train")[:samples_per_task]:
                ev._run(spec.key, sid, policy)
    if policy.normaliser.count == 0:
        raise NammError(
            "No memory step ran while gathering normalisation statistics: the training prompts are shorter "
            f"than delay={recipe.delay}. Use longer prompts or a smaller delay."
        )
    policy.freeze_stats()
    atomic_fill_dir(run_dir / NORMALISATION_DIR, policy.save_pretrained)  # a whole checkpoint, or none
    if evaluator is not None:
        evaluator.policy.normaliser = policy.normaliser


def checkpoint_writer(recipe: Recipe, run_dir: Path):
    """``save_checkpoint(params, dir)`` for the loop: a NAMM checkpoint with the frozen statistics."""

    def save(params: np.ndarray, directory: Path) -> None:
        policy = recipe_namm(recipe, run_dir)
        subspace = recipe_subspace(recipe, policy)
        if subspace is not None:
            params = subspace.embed(params)
        policy.set_params(torch.as_tensor(params, dtype=torch.float32))
        policy.save_pretrained(directory)

    return save
