"""The strongest question-agnostic peers: TOVA, AdaKV, PyramidKV and KVzip, each one scoring method.

As the classic policies they keep, at every memory step, ``budget`` tokens per KV head on average; AdaKV and
KVzip share a layer's budget between its heads by score (:func:`~namm.policies.selection.head_adaptive_keep`),
which in namm's per-head cache is a real saving (kvpress masks the evicted keys of a full cache instead), and
PyramidKV shares the model's budget between layers. KVzip scores tokens by running the model: it requests
a probe (``StepRequest(probe=True)``) and the engine runs its reconstruction prompt through the cache before
each memory step (see :class:`~namm.policies.base.Probe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.errors import NammError
from namm.policies.base import (
    BudgetPolicy,
    MemoryStep,
    StepRequest,
    probe_max_attention,
    protect,
    recent_mask,
    sink_mask,
)
from namm.policies.classic import SnapKV
from namm.policies.selection import head_adaptive_keep, layer_shared_keep


@dataclass
class TOVA(BudgetPolicy):
    """Attention from the newest query, averaged over the layer's heads (Oren et al., 2024, arXiv 2401.06104).

    Every head of a layer keeps the same tokens (one ranking per layer, as in the paper and kvpress); the
    newest token is always kept. The paper evicts one token per decoding step; here it runs at memory steps.
    """

    name = "tova"
    request = StepRequest(queries=1)

    def score(self, step: MemoryStep) -> torch.Tensor:
        att = step.attention[:, :, -1]  # (B, H, T): the newest query, averaged over its group's query heads
        b, h, t = att.shape
        # Average by absolute position, so the rule holds whatever each head's slot layout is.
        pos = step.positions.clamp(min=0).reshape(b, h * t)
        per_position = torch.zeros(b, step.n_seen, dtype=torch.float32, device=att.device)
        per_position.scatter_add_(1, pos, (att * step.valid).reshape(b, h * t))
        scores = per_position.gather(1, pos).view(b, h, t) / h
        return protect(scores, recent_mask(step, 1))


@dataclass
class AdaKV(SnapKV):
    """SnapKV scores, with each layer's budget shared between its heads by score (Feng et al., 2024, arXiv 2407.11550).

    A layer keeps ``budget x H`` tokens in all: its highest SnapKV scores over every head together, after each head
    has kept its ``floor(safeguard x budget)`` best (kvpress's ``alpha_safeguard``). Heads then hold different
    numbers of tokens; namm's cache stores each head apart when they differ (:mod:`namm.store`), so the saving is
    real memory (kvpress keeps evicted slots as placeholder keys).

    Args:
        budget, window, kernel: as :class:`~namm.policies.classic.SnapKV`.
        safeguard: share of the per-head budget every head keeps whatever the other heads score.
    """

    name = "adakv"
    shares_heads = True
    safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.safeguard <= 1.0:
            raise NammError(f"AdaKV: safeguard must be in [0, 1], got {self.safeguard}.")

    def keep(self, step: MemoryStep, scores: torch.Tensor) -> torch.Tensor:
        return head_adaptive_keep(scores, step.valid, self.budget_tokens(step), self.safeguard)


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with per-layer budgets falling linearly with depth (Cai et al., 2024, arXiv 2406.02069).

    With ``k`` the uniform per-head budget, the first layer keeps ``2k - m`` and the last ``m = max(k / beta,
    window)`` tokens per head (kvpress's rule; kvpress falls back to uniform budgets when ``k / beta`` is below
    the window, here the floor is the window instead); the mean over layers is ``k`` up to rounding. When the
    first layer's share would exceed the tokens seen it is capped there and the last layer gets the rest. The line
    runs over all decoder layers; in a model with sliding-window layers (Gemma 3) only the full-attention ones are
    managed, so their mean is near, not at, ``k``.

    Args:
        budget, window, kernel: as :class:`~namm.policies.classic.SnapKV` (``budget`` is the mean over layers).
        beta: steepness: the last layer keeps ``k / beta`` (at least ``window``).
    """

    name = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise NammError(f"PyramidKV: beta must be >= 1, got {self.beta}.")

    def budget_tokens(self, step: MemoryStep) -> torch.Tensor:
        k = super().budget_tokens(step).double()
        if step.num_layers < 2:
            return k.long()
        n = step.n_real.double()
        low = torch.clamp(k / self.beta, min=float(self.window))
        high = 2 * k - low
        over = high > n
        high = torch.where(over, n, high)
        low = torch.where(over, 2 * k - n, low)
        flat = low > high  # budget below the window: uniform
        low, high = torch.where(flat, k, low), torch.where(flat, k, high)
        budget = high - step.layer_idx * (high - low) / (step.num_layers - 1)
        return torch.round(budget).long().clamp(min=1)


#: KVzip's reconstruction instructions (the authors' and kvpress's wording); see :class:`KVzip`.
RECONSTRUCT_PROMPT = "\n\nRepeat the previous context exactly."
RECONSTRUCT_CONTINUATION = "\n\nRepeat the part of the previous context exactly, starting with"


def reconstruction_ids(tokenizer, chunk: torch.Tensor, before: torch.Tensor, prompt: str = RECONSTRUCT_PROMPT,
                       continuation: str = RECONSTRUCT_CONTINUATION, suffix: str = "\n", overlap: int = 8
                       ) -> torch.Tensor:
    """``(1, P)`` probe ids that make the model repeat ``chunk`` (``(1, C)``): ``prompt`` for the first chunk, else
    ``continuation`` + the last ``overlap`` ids of ``before`` (``(1, K)``), then ``suffix`` and the chunk itself."""
    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return torch.tensor([ids], dtype=torch.long, device=chunk.device)

    first = before.shape[1] == 0
    head = encode(prompt) if first else torch.cat([encode(continuation), before[:, -overlap:]], dim=1)
    return torch.cat([head, encode(suffix), chunk], dim=1)


def reconstruction_scores(step: MemoryStep, sinks: int, key: str, who: str) -> torch.Tensor:
    """``(B, H, T)`` per slot, the most reconstruction attention it received (:func:`probe_max_attention` over the
    sinks and the probed chunk), computed for the chunk's tokens at this step and kept in ``step.state[key]`` for
    the older ones (0 for slots never probed)."""
    if step.probe is None:
        raise NammError(f"{who} scores tokens by running the model: use namm.generate (or namm's engine), not a "
                        "bare MemoryCache inside model.generate.")
    is_sink = sink_mask(step, sinks)
    chunk = step.valid & (step.positions >= step.probe.start)
    fresh = probe_max_attention(step, chunk | is_sink)
    old = step.state.get(key)
    scores = fresh if old is None else torch.where(chunk, fresh, old)
    step.state[key] = scores
    return scores


@dataclass
class KVzip(BudgetPolicy):
    """A token's score is the most attention it receives while the model repeats the context (Kim et al., 2025,
    arXiv 2505.23416); question-agnostic.

    Before each memory step the engine runs ``prompt`` + the tokens since the previous step (the chunk)
    through the cache, teacher-forced, and takes those tokens out again; each chunk token's score is the
    maximum, over the reconstruction queries and the query heads of its KV head, of their softmax attention,
    normalised over the sinks, the chunk and the reconstruction tokens (the authors' and kvpress's rule, so
    that chunks scored at different steps compare). Scores of earlier chunks are kept as per-token state.
    After the first chunk the prompt is ``continuation`` followed by the last ``overlap`` tokens before the
    chunk, as in kvpress. The first ``sinks`` tokens are always kept. This costs one extra forward pass over
    the context (reported as ``probe_seconds``).

    Args:
        budget: tokens (or fraction) kept per head, on average over the layer's heads.
        sinks: first real tokens always kept (and part of every chunk's normalisation).
        per_head: False (default): each layer keeps ``budget x H`` tokens, its best scores over all heads
            (kvpress's ``layerwise=True``; kvpress's default threshold over all layers at once needs every
            layer's scores before any eviction). True: ``budget`` per head (the authors' "uniform" level).
        prompt / continuation: the reconstruction instructions; ``suffix`` follows them (a chat template's
            assistant header in kvpress; prompts here are raw text, as kvpress for a model without a template).
        overlap: tokens of the previous chunk quoted after ``continuation``.
    """

    name = "kvzip"
    request = StepRequest(probe=True)
    sinks: int = 4
    per_head: bool = False
    prompt: str = RECONSTRUCT_PROMPT
    continuation: str = RECONSTRUCT_CONTINUATION
    suffix: str = "\n"
    overlap: int = 8

    def probe_ids(self, tokenizer, chunk: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        return reconstruction_ids(tokenizer, chunk, before, self.prompt, self.continuation, self.suffix, self.overlap)

    def score(self, step: MemoryStep) -> torch.Tensor:
        scores = reconstruction_scores(step, self.sinks, "kvzip", type(self).__name__)
        return protect(scores, sink_mask(step, self.sinks))

    @property
    def shares_heads(self) -> bool:  # type: ignore[override]
        return not self.per_head

    def keep(self, step: MemoryStep, scores: torch.Tensor) -> torch.Tensor:
        return layer_shared_keep(scores, step.valid, self.budget_tokens(step), self.per_head)
