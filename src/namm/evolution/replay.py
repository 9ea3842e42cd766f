"""Replay evaluation: many NAMM members scored on a sample from one recorded run (a training-time surrogate).

Exact evaluation (:class:`~namm.evolution.lm.LMEvaluator`) runs the model over the whole prompt once per
member, KVzip's reconstruction probe included (about 2.5x a plain prefill). Replay runs it once per sample:

1. :func:`record` runs the prompt with every token kept and the reconstruction probe at every memory step
   (the exact engine, :func:`namm.generate`) and keeps, per layer, the prompt's keys and values and every
   token's reconstruction score, with the full cache's gold-answer margins (:class:`Recording`, saved as
   safetensors so a resumed run reuses it).
2. :func:`replay` scores ``P`` members at once: the recorded keys, values and reconstruction scores are fed
   to a :class:`~namm.cache.MemoryCache` chunk by chunk (:meth:`MemoryCache.append`), the cache's own memory
   steps run the members' scoring and eviction (the runtime's code, nothing re-implemented), and only the last
   ``recompute`` tokens or more of the prompt (the question, in prompt mode) run through the model again,
   against each member's cache, before the gold answer is teacher-forced.

What it approximates: an evicted token still shaped the recorded keys and values of the tokens after it (they
were computed with it in the cache), and a token's reconstruction score is the one the full cache gave it.
The tokens that are recomputed, the question and the answer, see only what each member kept. The scorer may
read only features that need no attention weights (the reconstruction score, the key norm, the recency code
and the depth allocation); the spectrogram would need every step's attention under each member's cache.
``benchmarks/replay_fidelity.py`` measures the agreement with exact evaluation; validation stays exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from namm.atomic import atomic_write_bytes
from namm.cache import MemoryCache, cache_argument
from namm.engine import encode_answer, generate, score_answer
from namm.errors import NammError
from namm.evolution.lm import LMEvaluator, margin_score
from namm.memory import NAMM
from namm.memory.features import RECONSTRUCTION_KEY
from namm.memory.policy import RECONSTRUCTION_SINKS
from namm.policies.base import MemoryStep, Policy, StepRequest
from namm.policies.peers import reconstruction_ids, reconstruction_scores
from namm.scoring import gold_answer
from namm.store import EvictingLayer

REPLAY_DIR = "replay"


@dataclass
class Recording:
    """One prompt's keep-all run, enough to replay any member's memory steps on it.

    Attributes:
        ids: ``(1, N)`` prompt token ids, as the engine encoded them.
        keys, values: per managed layer, ``(1, H, N, D)`` the prompt's keys (post-RoPE) and values.
        reconstruction: per managed layer, ``(1, H, N)`` each token's reconstruction score (KVzip's probe).
        answer_ids: ``(1, A)`` the gold answer's ids.
        full_margins: ``(A,)`` the full cache's per-token gold-answer margins (nats).
    """

    ids: torch.Tensor
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    reconstruction: dict[int, torch.Tensor]
    answer_ids: torch.Tensor
    full_margins: np.ndarray

    def save(self, path: str | Path, meta: dict[str, str]) -> None:
        tensors = {"ids": self.ids, "answer_ids": self.answer_ids,
                   "full_margins": torch.as_tensor(self.full_margins, dtype=torch.float64)}
        for name, table in (("keys", self.keys), ("values", self.values), ("reconstruction", self.reconstruction)):
            tensors.update({f"{name}.{layer}": t.contiguous() for layer, t in table.items()})
        atomic_write_bytes(Path(path), save(tensors, metadata={"meta": json.dumps(meta, sort_keys=True)}))

    @classmethod
    def load(cls, path: str | Path, meta: dict[str, str]) -> Recording | None:
        """The recording at ``path`` if it was made with ``meta`` (model, prompt, cadence), else ``None``."""
        try:
            with safe_open(str(path), framework="pt") as f:
                if json.loads((f.metadata() or {}).get("meta", "{}")) != meta:
                    return None
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise NammError(f"{path}: cannot read the replay recording ({e}); delete it to record again.") from e
        tables: dict[str, dict[int, torch.Tensor]] = {"keys": {}, "values": {}, "reconstruction": {}}
        for key, t in tensors.items():
            name, _, layer = key.partition(".")
            if name in tables:
                tables[name][int(layer)] = t
        return cls(tensors["ids"], tables["keys"], tables["values"], tables["reconstruction"],
                   tensors["answer_ids"], tensors["full_margins"].numpy())


@dataclass(eq=False)
class _Recorder(Policy):
    """Keeps every token, runs KVzip's probe before every step and remembers each layer's last step."""

    name = "replay-recorder"
    request = StepRequest(probe=True)

    def __post_init__(self) -> None:
        # per layer, its last step's (keys, values, reconstruction scores): views of the store's buffers, which
        # later appends extend without writing over them (namm.store)
        self.steps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.ids: torch.Tensor | None = None

    def probe_ids(self, tokenizer, chunk: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([before, chunk], dim=1)  # every token seen so far, as the engine holds them
        return reconstruction_ids(tokenizer, chunk, before)

    def score(self, step: MemoryStep) -> torch.Tensor:
        scores = reconstruction_scores(step, RECONSTRUCTION_SINKS, RECONSTRUCTION_KEY, "The replay recorder")
        self.steps[step.layer_idx] = (step.keys, step.values, scores)
        if not bool(step.valid.all()):
            raise NammError("Replay recording: a step found evicted slots in a keep-all run.")
        return scores

    def over_budget(self, step: MemoryStep) -> bool:
        return True  # a last step at the end of the prompt, so its last chunk is probed too


def _check_model(model) -> None:
    config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NammError(f"Replay evaluation needs every layer to be a full-attention layer; {type(model).__name__} "
                        f"has {sorted(kinds)}. Use exact evaluation (recipe field replay_recompute: 0).")


@torch.inference_mode()
def record(model, tokenizer, prompt: str, answer: str, delay: int, chunk_size: int) -> Recording:
    """Run ``prompt`` keeping every token, with KVzip's probe before every memory step; see :class:`Recording`."""
    _check_model(model)
    recorder = _Recorder()
    out = generate(model, tokenizer, prompt, recorder, max_new_tokens=0, delay=delay, chunk_size=chunk_size,
                   answer=answer)
    n = out.stats.prompt_tokens[0]
    ids = recorder.ids
    if ids is None or not recorder.steps:
        raise NammError("Replay recording: no memory step ran; the prompt is shorter than one step.")
    steps = recorder.steps
    if ids.shape[1] != n:
        raise NammError(f"Replay recording: the last step saw {ids.shape[1]} tokens of a {n}-token prompt.")
    for layer, (keys, _, _) in steps.items():
        if keys.shape[2] != ids.shape[1]:
            raise NammError(f"Replay recording: layer {layer}'s last step does not hold the whole prompt.")
    return Recording(
        ids=ids.cpu(),
        keys={i: k.detach().clone() for i, (k, _, _) in steps.items()},
        values={i: v.detach().clone() for i, (_, v, _) in steps.items()},
        reconstruction={i: r.detach().float().clone() for i, (_, _, r) in steps.items()},
        answer_ids=encode_answer(tokenizer, answer),
        full_margins=np.asarray(out.answer.margins, dtype=np.float64),
    )


def _inject(layer: EvictingLayer, recording: Recording) -> None:
    """Every slot's reconstruction score, read by position from the recording."""
    table = recording.reconstruction[layer.layer_idx].to(layer.device)
    positions = layer.positions
    state = layer.state  # a ragged layer's is a stacked copy: assigned back below
    state[RECONSTRUCTION_KEY] = table.expand(positions.shape[0], -1, -1).gather(2, positions)
    layer.state = state


def recompute_start(n: int, delay: int, recompute: int) -> int:
    """The first prompt position run through the model again: the last multiple of ``delay`` at least
    ``recompute`` tokens before the end (0 for a short prompt)."""
    return max(0, (n - recompute) // delay * delay)


@torch.inference_mode()
def replay(model, policy: NAMM, recording: Recording, delay: int, chunk_size: int, recompute: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Score the members of ``policy``'s population (``P`` rows; one row without a population) on a recording.

    Returns:
        ``(P, A)`` gold-answer margins under each member's cache and ``(P,)`` its mean kept-cache fraction over
        the memory steps (kept / seen, as the engine's statistics count it).
    """
    _check_model(model)
    if policy.reads_attention():
        raise NammError("Replay evaluation cannot score attention features (the spectrogram, the query entropy): "
                        "search only head_weight entries of the recency code, key norm and reconstruction score, "
                        "and the depth allocation, or use exact evaluation (replay_recompute: 0).")
    if delay % chunk_size:
        raise NammError(f"chunk_size ({chunk_size}) must divide delay ({delay}).")
    rows = 1 if policy.population is None else policy.population.shape[0]
    ids = recording.ids.to(model.device).expand(rows, -1)
    n = ids.shape[1]
    split = recompute_start(n, delay, max(1, recompute))
    cache = MemoryCache(model, policy, delay=delay)
    cache.hold_steps()
    cache.auto_end_prompt = False
    managed = cache.managed
    logits = None
    start = 0
    while start < n:
        end = min(n, (start // chunk_size + 1) * chunk_size)
        if end <= split:
            for layer in managed:
                i = layer.layer_idx
                cache.append(i, recording.keys[i][:, :, start:end].expand(rows, -1, -1, -1),
                             recording.values[i][:, :, start:end].expand(rows, -1, -1, -1))
        else:
            out = model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1,
                        **{cache_argument(model): cache})
            logits = out.logits[:, -1]
        for layer in managed:
            _inject(layer, recording)
        cache.run_due_steps()
        start = end
    cache.end_prompt()
    answers = score_answer(model, cache, logits, recording.answer_ids)
    margins = np.array([a.margins for a in answers], dtype=np.float64)
    fractions = [r.kept.double() / r.n_seen for r in cache.stats.steps]  # (B, H) each
    fraction = torch.stack(fractions).mean(dim=(0, 2)).numpy() if fractions else np.ones(rows)
    return margins, fraction


@dataclass
class ReplayStats:
    """What :class:`ReplayEvaluator` reports of a replay, in the place of the engine's statistics: per member,
    the mean over memory steps and heads of kept / seen tokens right after each step."""

    row_cache_fraction: list[float]


class ReplayEvaluator(LMEvaluator):
    """:class:`LMEvaluator` whose training samples are scored by :func:`replay` (``metric: margin``) and whose
    validation stays exact (decoding, the task metric). Recordings live in ``run_dir/replay/``."""

    def __init__(self, recipe, run_dir, model=None, tokenizer=None):
        super().__init__(recipe, run_dir, model, tokenizer)
        if recipe.metric != "margin":
            raise NammError(f"Replay evaluation scores the gold answer's margins: set metric: margin (got "
                            f"{recipe.metric!r}).")
        _check_model(self.model)
        self.recompute = recipe.replay_recompute
        self._recordings: dict[str, Recording] = {}
        self.record_seconds = 0.0

    def _meta(self, task: str, sample_id: str) -> dict[str, str]:
        sample = self.sample(task, sample_id)
        text = json.dumps([sample.prompt, gold_answer(sample, self.task(task))])
        return {"model": self.recipe.model, "dtype": self.recipe.dtype, "delay": str(self.recipe.delay),
                "chunk_size": str(self.recipe.chunk_size), "prompt": hashlib.sha1(text.encode()).hexdigest()}

    def recording(self, task: str, sample_id: str) -> Recording:
        """The sample's recording: from memory, from ``run_dir/replay/``, or recorded now and saved there."""
        key = f"{task}/{sample_id}"
        if key in self._recordings:
            return self._recordings[key]
        meta = self._meta(task, sample_id)
        path = self.run_dir / REPLAY_DIR / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"
        rec = Recording.load(path, meta) if path.exists() else None
        if rec is None:
            t0 = time.perf_counter()
            sample = self.sample(task, sample_id)
            rec = record(self.model, self.tokenizer, sample.prompt, gold_answer(sample, self.task(task)),
                         self.recipe.delay, self.recipe.chunk_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            rec.save(path, meta)
            self.record_seconds += time.perf_counter() - t0
        if len(self._recordings) >= 16:  # bound the memory (about 95 MB each at 2k): forget the oldest
            self._recordings.pop(next(iter(self._recordings)))
        self._recordings[key] = rec
        return rec

    def full_margins(self, task: str, sample_id: str) -> np.ndarray:
        return self.recording(task, sample_id).full_margins

    def _member_scores(self, task: str, sample_id: str, copies: int):
        if not self.graded(sample_id):
            return super()._member_scores(task, sample_id, copies)
        rec = self.recording(task, sample_id)
        margins, fraction = replay(self.model, self.policy, rec, self.recipe.delay, self.recipe.chunk_size,
                                   self.recompute)
        if margins.shape[0] != copies:
            raise NammError(f"Replay scored {margins.shape[0]} rows for {copies} members.")
        return margin_score(margins, rec.full_margins), ReplayStats(fraction.tolist())


__all__ = ["Recording", "ReplayEvaluator", "record", "recompute_start", "replay"]
