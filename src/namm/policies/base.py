"""The policy interface: a policy scores cached tokens, the runtime evicts.

A policy is a small dataclass. At every memory step the runtime hands it one :class:`MemoryStep` per
managed layer; the policy returns a score per cached token (higher = keep) from :meth:`Policy.score`,
and :meth:`Policy.keep` turns scores into a keep mask (by default: the ``budget`` highest-scored
tokens of every head). Gathering, compaction and bookkeeping live once, in :mod:`namm.cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from namm.errors import NammError
from namm.policies.allocation import DepthAllocation, HeadAllocation, allocate, allocate_heads
from namm.policies.selection import layer_total, top_k_keep

#: ``StepRequest.queries`` value asking for every query since the previous memory step.
ALL_QUERIES: Literal["all"] = "all"


@dataclass(frozen=True)
class StepRequest:
    """What a policy asks of the runtime for its memory steps, declared once on the policy class.

    Attributes:
        queries: whose attention the step carries: ``None`` (no attention weights are ever computed),
            ``ALL_QUERIES`` (``"all"``: every query since the previous memory step) or ``k >= 1`` (the last ``k``).
        stream: deliver that attention as :attr:`MemoryStep.attention_stream`, block by block of queries, instead
            of the whole ``(B, H, Q, T)`` matrix in :attr:`MemoryStep.attention` (read either with
            :func:`read_attention`); the runtime then never builds the whole matrix.
        probe: the policy scores tokens by running the model on extra tokens (KVzip): before each memory step the
            engine runs :meth:`Policy.probe_ids` through the cache and the step carries a :class:`Probe`.
        evicts: False for a policy that never evicts (``Full``): the engine may then prefill in one pass.
    """

    queries: int | Literal["all"] | None = None
    stream: bool = False
    probe: bool = False
    evicts: bool = True

    def __post_init__(self) -> None:
        q = self.queries
        if not (q is None or q == ALL_QUERIES or (isinstance(q, int) and not isinstance(q, bool) and q >= 1)):
            raise NammError(f"StepRequest.queries must be None, {ALL_QUERIES!r} or a count >= 1, got {q!r}.")
        if self.stream and q is None:
            raise NammError("StepRequest(stream=True) needs queries: there is no attention to stream otherwise.")

    @property
    def attention(self) -> bool:
        """Whether memory steps carry attention weights (and the layers keep recent queries for them)."""
        return self.queries is not None


@dataclass
class MemoryStep:
    """Everything a policy may look at for one layer at one memory step.

    Shapes: ``B`` batch rows, ``H`` KV heads, ``T`` cache slots (the longest head; shorter heads are
    padded with invalid slots), ``D`` head dim, ``Q`` recent queries.

    Attributes:
        layer_idx: index of the decoder layer.
        num_layers: number of decoder layers in the model.
        keys: ``(B, H, T, D)`` cached keys (post-RoPE, as the model stores them).
        values: ``(B, H, T, D)`` cached values.
        positions: ``(B, H, T)`` int64, the absolute position of each slot's token.
        valid: ``(B, H, T)`` bool, False for evicted-padding slots and left-padding tokens.
        attention: ``(B, H, Q, T)`` float32 softmax attention that the ``Q`` most recent queries gave each
            slot, averaged over the query heads sharing a KV head; rows of padding queries are zero.
            ``None`` unless the policy's :class:`StepRequest` asks for queries (and not as a stream).
        query_positions: ``(Q,)`` int64 absolute positions of those queries, or ``None``.
        attention_stream: for a policy whose request has ``stream`` (then ``attention`` is ``None``): a callable
            taking increasing query bounds ``[0, ..., Q]`` and yielding, per range, the ``(B, H, L, V)``
            attention of those ``L`` queries over the first ``V`` slots (the later slots are in their future).
            :func:`read_attention` reads either form.
        n_seen: tokens processed so far (absolute count, padding included).
        n_real: ``(B,)`` int64, real (non-padding) tokens processed so far per row.
        state: per-token policy state, each tensor ``(B, H, T, ...)``. New slots are appended as zeros;
            the runtime gathers every entry with the kept indices. A policy may replace entries.
        managed_layers: indices of the layers the cache manages (``None``: all ``num_layers``), so a policy
            can place this layer by relative depth among them (Gemma 3: only its global layers).
        probe: for a policy whose request has ``probe`` (KVzip): the tokens the engine ran through the cache just
            before this step (see :class:`Probe`), else ``None``.

    Per-row parameters (a population of NAMM members, one per batch row) are the policy's own
    (``NAMM.set_population``); the step carries no parameters.
    """

    layer_idx: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    attention: torch.Tensor | None
    query_positions: torch.Tensor | None
    n_seen: int
    n_real: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_stream: Callable[[list[int]], Iterator[torch.Tensor]] | None = None
    managed_layers: tuple[int, ...] | None = None
    probe: Probe | None = None

    @property
    def depth_rank(self) -> tuple[int, int]:
        """``(index of this layer among the managed layers, number of managed layers)``."""
        layers = self.managed_layers if self.managed_layers is not None else tuple(range(self.num_layers))
        if self.layer_idx not in layers:
            raise NammError(f"Layer {self.layer_idx} is not among the managed layers {layers}.")
        return layers.index(self.layer_idx), len(layers)


@dataclass
class Probe:
    """Tokens the engine ran through the cache right before a memory step and took out again, seen from one layer.

    A policy that scores tokens by how the model reads them (KVzip: a "repeat the context" prompt followed by
    the context itself) requests ``StepRequest(probe=True)`` and builds the tokens in :meth:`Policy.probe_ids`;
    the engine runs them through the cache (they attend to every cached slot and, causally, to each other), the
    cache keeps their queries and keys at each layer and removes them before the step. ``P`` probe tokens.

    Attributes:
        queries: ``(B, H_q, P, D)`` post-RoPE queries of the probe tokens.
        keys: ``(B, H, P, D)`` their keys (no longer in the cache).
        start: absolute position of the first token the probe covers; the chunk is ``start .. n_seen - 1``,
            every token since the layer's previous memory step.
        scaling: the layer's softmax scale.
        softcap: the layer's attention logit soft-cap, or ``None``.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    start: int
    scaling: float
    softcap: float | None = None


def probe_max_attention(step: MemoryStep, over: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Per slot, the most attention any probe query of any query head of its KV head gave it.

    The softmax of each probe query is normalised over the slots in ``over`` plus the probe tokens themselves
    (causally), as if the other slots were absent: KVzip normalises each chunk's reconstruction over the
    sinks, the chunk and the reconstruction tokens only, so that chunks scored at different steps compare.
    With ``over = step.valid`` it is the attention the model itself computed.

    Args:
        step: a memory step carrying a :class:`Probe`.
        over: ``(B, H, T)`` bool, the cached slots the softmax runs over (a subset of ``step.valid``).
        block: probe queries per block of logits (bounds the transient ``(B, H, G, block, T + P)`` tensor).

    Returns:
        ``(B, H, T)`` float32; 0 outside ``over``.
    """
    probe = step.probe
    if probe is None:
        raise NammError("This memory step carries no probe (the policy must request probe=True and run in namm's "
                        "engine).")
    b, hq, p, d = probe.queries.shape
    h = step.keys.shape[1]
    g = hq // h
    keys = torch.cat([step.keys, probe.keys], dim=2).float().transpose(-1, -2)  # (B, H, D, T + P)
    t = step.keys.shape[2]
    hidden = ~over  # (B, H, T)
    causal = torch.ones(p, p, dtype=torch.bool, device=keys.device).tril_()
    best = torch.zeros(b, h, t, dtype=torch.float32, device=keys.device)
    queries = probe.queries.view(b, h, g, p, d)
    for lo in range(0, p, block):
        hi = min(p, lo + block)
        logits = torch.matmul(queries[:, :, :, lo:hi].float() * probe.scaling, keys[:, :, None])  # (B, H, G, L, T+P)
        if probe.softcap:
            logits = torch.tanh(logits / probe.softcap) * probe.softcap
        logits[..., :t].masked_fill_(hidden[:, :, None, None, :], float("-inf"))
        logits[..., t:].masked_fill_(~causal[lo:hi], float("-inf"))
        att = torch.softmax(logits, dim=-1)[..., :t]
        best = torch.maximum(best, att.amax(dim=(2, 3)))
    return best


def read_attention(step: MemoryStep, bounds: list[int]) -> Iterator[torch.Tensor]:
    """The step's attention in query blocks ``bounds[i]:bounds[i+1]``, from whichever form the step carries
    (:attr:`MemoryStep.attention_stream` or the whole :attr:`MemoryStep.attention`).

    Yields ``(B, H, L, V)`` float32 blocks; slots past ``V`` got no attention from the block's queries.
    """
    if step.attention_stream is not None:
        yield from step.attention_stream(bounds)
        return
    if step.attention is None:
        raise NammError("This memory step carries no attention (the policy's StepRequest must ask for queries).")
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        yield step.attention[:, :, lo:hi].float()


def sink_mask(step: MemoryStep, sinks: int) -> torch.Tensor:
    """``(B, H, T)`` bool: the slots holding one of the ``sinks`` first real tokens of each row (attention sinks;
    left padding comes first and is not counted)."""
    first_real = (step.n_seen - step.n_real).view(-1, 1, 1)
    return step.valid & (step.positions - first_real < sinks)


def recent_mask(step: MemoryStep, window: int) -> torch.Tensor:
    """``(B, H, T)`` bool: the slots holding one of the ``window`` newest tokens of each row."""
    newest = step.n_seen - 1
    return step.valid & (step.positions > newest - window)


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Lift ``scores`` where ``mask`` is set above every other score (kvpress pads with ``max + 1``)."""
    finite = scores.masked_fill(~torch.isfinite(scores), 0)
    top = finite.amax() + finite.abs().amax() + 1.0
    return torch.where(mask, scores + top + 1.0, scores)


@dataclass
class Policy:
    """Base class: keeps everything. Subclasses override :meth:`score` (and maybe :meth:`keep`)."""

    #: Short name used by the CLI and the registry.
    name: ClassVar[str] = "base"
    #: What the policy's memory steps need from the runtime (attention, in which form, a probe), see
    #: :class:`StepRequest`. A subclass may make it a property of its options (SnapKV's window).
    request: ClassVar[StepRequest] = StepRequest()

    def score(self, step: MemoryStep) -> torch.Tensor:
        """Return ``(B, H, T)`` float scores, higher = keep. Invalid slots are ignored."""
        return torch.zeros_like(step.positions, dtype=torch.float32)

    def keep(self, step: MemoryStep, scores: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, H, T)`` bool keep mask (a subset of ``step.valid``)."""
        return step.valid

    def validate(self, context_tokens: int) -> None:
        """Raise :class:`NammError` if the policy cannot run on a context of ``context_tokens`` tokens."""

    def probe_ids(self, tokenizer, chunk: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """The ``(1, P)`` token ids the engine runs through the cache before a memory step (``request.probe`` only).

        Args:
            tokenizer: the model's tokenizer.
            chunk: ``(1, C)`` ids of the tokens since the previous memory step (the ones the step scores).
            before: ``(1, K)`` ids of the tokens just before the chunk (empty for the first chunk).
        """
        raise NotImplementedError(f"{type(self).__name__} requests a probe but does not define probe_ids.")

    def over_budget(self, step: MemoryStep) -> bool:
        """Whether the layer described by ``step`` holds more tokens than the policy allows now.

        Asked when the prompt ends (``step.attention`` is ``None``): if True, a memory step runs there, off
        the ``delay`` cadence, so a budget holds before the answer is generated. Policies without a budget
        (and learned policies, which keep their own cadence) say False.
        """
        return False

    def describe(self) -> str:
        return repr(self)

    def fingerprint(self) -> str:
        """A string that changes whenever the policy would act differently (every option and, for a learned
        policy, its weights); the harness resumes a sample only from a record with the same fingerprint."""
        return repr(self)


@dataclass(frozen=True)
class BudgetSchedule:
    """A token budget that changes over the prompt: ``steps`` is ``((n_seen, tokens), ...)``, increasing in
    ``n_seen``; a memory step that has seen ``n`` tokens gets the budget of the last entry with
    ``n_seen <= n`` (the first entry's before it).

    Used to compare a baseline with a NAMM at the same cache size *at every memory step*: the NAMM's cache
    grows and shrinks over a prompt, so one fixed budget would give the baseline a different cache size
    at every step (see ``namm compare --match-budget namm``).
    """

    steps: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise NammError("BudgetSchedule needs at least one (n_seen, tokens) entry.")
        seen = [n for n, _ in self.steps]
        if seen != sorted(set(seen)):
            raise NammError(f"BudgetSchedule entries must have strictly increasing n_seen, got {seen}.")
        if min(t for _, t in self.steps) < 1:
            raise NammError(f"BudgetSchedule budgets must be at least 1 token, got {self.steps}.")

    def at(self, n_seen: int) -> int:
        """The budget in tokens for a memory step that has seen ``n_seen`` tokens."""
        budget = self.steps[0][1]
        for n, tokens in self.steps:
            if n > n_seen:
                break
            budget = tokens
        return budget

    def __str__(self) -> str:
        sizes = [t for _, t in self.steps]
        return f"{len(sizes)}-step schedule, {min(sizes)}-{max(sizes)} tokens"


@dataclass
class BudgetPolicy(Policy):
    """A policy that keeps, in every head, the ``budget`` highest-scored tokens.

    ``budget`` is a token count (``int >= 1``), a fraction of the tokens seen so far (``0 < float <= 1``)
    or a :class:`BudgetSchedule` of token counts per memory step. With an ``allocation``
    (:class:`~namm.policies.allocation.DepthAllocation`) the budget is the *mean* over the managed layers
    and each layer gets its share of it; with a :class:`~namm.policies.allocation.HeadAllocation` it is the
    mean over every (layer, KV head) and each head gets its own share; without one every head gets the same.
    """

    budget: int | float | BudgetSchedule = 0.25
    allocation: DepthAllocation | HeadAllocation | None = None

    def __post_init__(self) -> None:
        b = self.budget
        name = type(self).__name__
        if isinstance(b, BudgetSchedule):
            return
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise NammError(f"{name}: budget must be a token count or a fraction, got {b!r}.")
        if isinstance(b, float) and not 0.0 < b <= 1.0:
            raise NammError(
                f"{name}: a fractional budget must be in (0, 1], got {b}. "
                "Pass a token count (e.g. 256) or a fraction (e.g. 0.25)."
            )
        if isinstance(b, int) and b < 1:
            raise NammError(f"{name}: budget must be at least 1 token (or a fraction in (0, 1]), got {b}.")

    def budget_tokens(self, step: MemoryStep) -> torch.Tensor:
        """``(B,)`` int64 tokens each head of each row may keep at this memory step, or ``(B, H)`` under a
        :class:`~namm.policies.allocation.HeadAllocation`."""
        if isinstance(self.allocation, HeadAllocation):
            return head_tokens(self.allocation.tensor(), self.budget, step, self.allocation.floor)
        knots = torch.tensor(self.allocation.knots) if self.allocation is not None else None
        return budget_tokens(self.budget, step, knots)

    def validate(self, context_tokens: int) -> None:
        if isinstance(self.budget, int) and self.budget > context_tokens:
            raise NammError(
                f"{type(self).__name__}: budget {self.budget} tokens is above the context ({context_tokens} "
                "tokens), so nothing would ever be evicted. Use a smaller budget, a fraction, or the Full policy."
            )

    #: Whether a layer's heads share its budget (``budget x H`` tokens over all heads, kept by score): the
    #: over-budget check then compares the layer's total, not each head.
    shares_heads: ClassVar[bool] = False

    def over_budget(self, step: MemoryStep) -> bool:
        """True when some head holds more than its budget (some layer, for a policy whose heads share it). A
        :class:`BudgetSchedule` sizes the steps of the cadence it was matched to (another policy's steps), so it
        never asks for an extra step."""
        if isinstance(self.budget, BudgetSchedule):
            return False
        return exceeds(step, self.budget_tokens(step), shared=self.shares_heads)

    def keep(self, step: MemoryStep, scores: torch.Tensor) -> torch.Tensor:
        return top_k_keep(scores, step.valid, self.budget_tokens(step))

    def describe(self) -> str:
        b = self.budget
        if isinstance(b, float):
            b = f"{b * 100:g}%"
        elif isinstance(b, BudgetSchedule):
            b = str(b)
        else:
            b = f"{b} token{'s' if b != 1 else ''}"
        where = f", {self.allocation}" if self.allocation is not None else ""
        return f"{self.name} (budget {b}{where})"


def exceeds(step: MemoryStep, tokens: torch.Tensor, shared: bool = False) -> bool:
    """Whether some head holds more valid slots than ``tokens`` (``(B,)`` per row or ``(B, H)`` per head); with
    ``shared`` (the heads of a layer share its budget), whether some row's layer holds more than its total."""
    if shared:
        return bool((step.valid.sum(dim=(1, 2)) > layer_total(tokens, step.valid.shape[1])).any())
    limit = tokens[:, None] if tokens.dim() == 1 else tokens
    return bool((step.valid.sum(dim=-1) > limit).any())


def mean_fraction(budget: int | float | BudgetSchedule, step: MemoryStep) -> torch.Tensor:
    """``(B,)`` float64 budget as a fraction of each row's real tokens, in ``(0, 1]``."""
    n_real = step.n_real.double().clamp(min=1)
    if isinstance(budget, BudgetSchedule):
        budget = budget.at(step.n_seen)
    if isinstance(budget, int):
        return (budget / n_real).clamp(max=1.0)
    return torch.full_like(n_real, float(budget))


def budget_tokens(budget: int | float | BudgetSchedule, step: MemoryStep,
                  knots: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` int64 tokens per head a budget allows at this step: a token count (at most the real tokens), a
    fraction rounded up (``ceil(n x fraction)``, exact for products like ``10 x 0.7``), a schedule's count, or with
    ``knots`` this layer's share under a depth allocation (:func:`allocated_tokens`). Every budgeted policy, the
    NAMM included, counts its budget here."""
    if knots is not None:
        return allocated_tokens(knots, budget, step)
    n_real = step.n_real
    if isinstance(budget, BudgetSchedule):
        return torch.clamp(n_real, max=budget.at(step.n_seen))
    if isinstance(budget, int):
        return torch.clamp(n_real, max=budget)
    return torch.ceil(n_real.double() * budget - 1e-9).long().clamp(min=1)


def allocated_tokens(knots: torch.Tensor, budget: int | float | BudgetSchedule, step: MemoryStep) -> torch.Tensor:
    """``(B,)`` int64 tokens per head of this layer under a depth allocation of ``budget``.

    ``knots`` is ``(K,)`` or ``(B, K)`` (one allocation per row, population mode); the layers' fractions
    average to the budget's fraction (:func:`~namm.policies.allocation.allocate`), rounded up to tokens.
    """
    index, count = step.depth_rank
    frac = allocate(knots.cpu(), mean_fraction(budget, step).cpu(), count)[:, index]  # (B,)
    tokens = torch.ceil(step.n_real.cpu().double() * frac - 1e-9).long().clamp(min=1)
    return torch.minimum(tokens, step.n_real.cpu()).to(step.n_real.device)


def head_tokens(logits: torch.Tensor, budget: int | float | BudgetSchedule, step: MemoryStep,
                floor: float = 0.0) -> torch.Tensor:
    """``(B, H)`` int64 tokens per KV head of this layer under a per-head allocation of ``budget``.

    ``logits`` is ``(L, H)`` over the managed layers (:func:`~namm.policies.allocation.allocate_heads`); the heads'
    fractions average to the budget's fraction over the whole model, rounded up to tokens.
    """
    index, count = step.depth_rank
    h = step.keys.shape[1]
    if tuple(logits.shape) != (count, h):
        raise NammError(f"A head allocation for {logits.shape[0]} layers x {logits.shape[1]} KV heads cannot run on a "
                        f"model with {count} managed layers x {h} KV heads; fit one for this model.")
    frac = allocate_heads(logits.cpu(), mean_fraction(budget, step).cpu(), floor)[:, index]  # (B, H)
    n_real = step.n_real.cpu()[:, None]
    tokens = torch.ceil(n_real.double() * frac - 1e-9).long().clamp(min=1)
    return torch.minimum(tokens, n_real).to(step.n_real.device)


__all__ = [
    "ALL_QUERIES",
    "BudgetPolicy",
    "BudgetSchedule",
    "MemoryStep",
    "Policy",
    "Probe",
    "StepRequest",
    "allocated_tokens",
    "budget_tokens",
    "exceeds",
    "head_tokens",
    "mean_fraction",
    "probe_max_attention",
    "protect",
    "read_attention",
    "recent_mask",
    "sink_mask",
]
