"""A cheap training-time surrogate for a budgeted NAMM: replay its selections on a keep-all recording.

The exact evaluation of a population member runs the whole prompt through the model with the member's
evicting cache. The replay instead runs each sample once with a cache that keeps everything
(:func:`record`), storing at every memory step (every ``delay`` tokens, plus one at the end of the prompt,
where a budget must hold before the answer) each layer's raw token features (the spectrogram EMA and the
key norm), and at the end the whole KV cache. A member is then scored by

1. replaying its selections: at every step and layer, the tokens it still holds get their features from
   the recording (standardised over those tokens, as the runtime does), the member's BAM scores them and
   keeps its budget (:meth:`NAMM.keep`, depth allocation included);
2. restoring the recorded KV cache minus what it evicted and teacher-forcing the gold answer through it
   (the prompt's last token is recomputed, so the first answer token sees the member's cache too).

What it approximates: in the exact run, the attention (hence the features) and the hidden states of the
later tokens are computed under the member's evicted cache; here they come from the keep-all run. The
answer's likelihood is exact given the kept set. Validation and the shipped results always use the exact
runtime. Only models whose every layer is managed (no sliding-window layers) are supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from namm.cache import MemoryCache, clear_pending
from namm.errors import NammError
from namm.memory.bam import bam_scores
from namm.memory.features import CARRY_KEY, EMA_KEY, LOG_FLOOR, recency_code, standardise_per_head, step_features
from namm.memory.policy import NAMM
from namm.policies.base import ALL_QUERIES, MemoryStep, Policy
from namm.policies.classic import Full


@dataclass
class Recording:
    """A keep-all run of one prompt.

    Attributes:
        steps: ``n_seen`` of every memory step, increasing (the last is the prompt's length ``N``).
        layers: the managed layer indices.
        ema: ``ema[s][l]`` ``(H, n_s, K)`` raw spectrogram EMA of every token at step ``s`` in layer ``l``.
        keys, values: ``[l]`` ``(H, N, D)`` the whole cache after the prompt.
        last_token: the prompt's last token id (recomputed against each member's cache).
    """

    steps: list[int]
    layers: tuple[int, ...]
    ema: list[list[torch.Tensor]] = field(repr=False)
    keys: list[torch.Tensor] = field(repr=False)
    values: list[torch.Tensor] = field(repr=False)
    last_token: int = 0


@dataclass
class _Recorder(Policy):
    """Keeps every token; at every memory step stores the layer's raw EMA features (and its KV at the end)."""

    name = "replay_recorder"
    query_window = ALL_QUERIES
    streams_attention = True
    evicts = False
    namm: NAMM | None = None
    log: dict = field(default_factory=dict)

    def score(self, step: MemoryStep) -> torch.Tensor:
        _, ema, carry = step_features(step, self.namm.config, self.namm.normaliser, step.state.get(EMA_KEY),
                                      step.state.get(CARRY_KEY))
        step.state[EMA_KEY], step.state[CARRY_KEY] = ema, carry
        self.log.setdefault(step.n_seen, {})[step.layer_idx] = ema[0].clone()
        self.log["kv", step.layer_idx] = (step.keys[0], step.values[0])
        return torch.zeros_like(step.positions, dtype=torch.float32)


@torch.inference_mode()
def record(model, prompt_ids: torch.Tensor, namm: NAMM, delay: int, chunk_size: int) -> Recording:
    """Run ``prompt_ids`` ``(N,)`` through a keep-all cache in chunks, a memory step every ``delay`` tokens and
    one at the end; return the :class:`Recording`."""
    recorder = _Recorder(namm=namm)
    cache = MemoryCache(model, recorder, delay=delay)
    if len(cache.managed) != len(cache.layers):
        raise NammError("The replay surrogate needs a model whose every layer is managed (no sliding window).")
    ids = prompt_ids.reshape(1, -1).to(model.device)
    n = ids.shape[1]
    start = 0
    while start < n:
        end = min(n, (start // chunk_size + 1) * chunk_size)
        clear_pending()
        model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
        start = end
    cache.compress_now()  # the step at the end of the prompt (a budget holds before the answer)
    log = recorder.log
    layers = cache.managed_ids
    steps = sorted(k for k in log if isinstance(k, int))
    return Recording(
        steps=steps,
        layers=layers,
        ema=[[log[s][layer] for layer in layers] for s in steps],
        keys=[log["kv", layer][0] for layer in layers],
        values=[log["kv", layer][1] for layer in layers],
        last_token=int(ids[0, -1]),
    )


def replay_keep(rec: Recording, policy: NAMM) -> list[torch.Tensor]:
    """The member's kept tokens after the last step: ``[l]`` ``(P, H, N)`` bool (``P`` rows of the population,
    or 1 without one)."""
    rows = policy.population.shape[0] if policy.population is not None else 1
    cfg = policy.config
    present: list[torch.Tensor | None] = [None] * len(rec.layers)
    for s, n in enumerate(rec.steps):
        for li, layer in enumerate(rec.layers):
            ema = rec.ema[s][li]  # (H, n, K)
            h = ema.shape[0]
            valid = torch.ones(rows, h, n, dtype=torch.bool)
            if present[li] is not None:
                old = present[li].shape[-1]
                valid[..., :old] = present[li]
            pos = torch.arange(n).expand(rows, h, n)
            age = (n - 1 - pos) + cfg.recency_offset
            parts = [recency_code(age, cfg.recency_dim, cfg.recency_max_freq)]
            raw = ema.unsqueeze(0).expand(rows, -1, -1, -1)
            if cfg.spectral_norm == "per_head":
                parts.append(standardise_per_head(torch.log(raw + LOG_FLOOR), valid))
            else:
                parts.append(policy.normaliser.normalise(raw))
            if cfg.key_norm_feature:
                norms = torch.log(rec.keys[li][:, :n].float().norm(dim=-1) + LOG_FLOOR)  # (H, n)
                parts.append(standardise_per_head(norms.expand(rows, h, n).unsqueeze(-1), valid))
            features = torch.cat(parts, dim=-1).masked_fill(~valid.unsqueeze(-1), 0.0)
            step = MemoryStep(layer_idx=layer, num_layers=max(rec.layers) + 1, keys=None, values=None,
                              positions=pos, valid=valid, attention=None, query_positions=None, n_seen=n,
                              n_real=torch.full((rows,), n), managed_layers=rec.layers)
            params = policy.population if policy.population is not None else policy.params
            scores = bam_scores(features, valid, params, cfg, pos)
            present[li] = policy.keep(step, scores) & valid
    return present


@torch.inference_mode()
def replay_logprob(model, rec: Recording, keep: list[torch.Tensor], answer_ids: torch.Tensor) -> np.ndarray:
    """``(P,)`` teacher-forced log-likelihood of ``answer_ids`` ``(M,)`` under each row's kept cache."""
    rows = keep[0].shape[0]
    cache = MemoryCache(model, Full(), delay=10**9)
    for layer, k, v, kept in zip(cache.managed, rec.keys, rec.values, keep, strict=True):
        # the prompt's last token is recomputed below: restore the N - 1 tokens before it
        layer.restore(k[None, :, :-1].expand(rows, -1, -1, -1), v[None, :, :-1].expand(rows, -1, -1, -1),
                      kept[..., :-1])
    answer = answer_ids.reshape(1, -1).to(model.device)
    ids = torch.cat([answer.new_tensor([[rec.last_token]]), answer[:, :-1]], dim=1).expand(rows, -1)
    clear_pending()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=0).logits.float()
    target = answer.expand(rows, -1)
    return torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1).sum(-1).cpu().numpy()


def kept_fraction(rec: Recording, keep: list[torch.Tensor]) -> np.ndarray:
    """``(P,)`` mean over layers and heads of the kept share of the prompt after the last step."""
    n = rec.steps[-1]
    return torch.stack([k.float().sum(-1).mean(-1) for k in keep]).mean(0).numpy() / n


__all__ = ["Recording", "kept_fraction", "record", "replay_keep", "replay_logprob"]
