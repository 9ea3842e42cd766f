"""NAMM hyperparameters (spec sections 2-4), with validation and a strict JSON round trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from namm.errors import NammError

SELECTION_MODES = ("per_layer", "per_head")
SPECTRAL_NORMS = ("global", "per_head")
#: Fields added after the first checkpoint format: a checkpoint without them takes their defaults.
OPTIONAL_FIELDS = frozenset({"budget", "depth_knots", "spectral_norm", "key_norm_feature", "bam_window",
                             "query_entropy_feature", "key_novelty_feature", "reconstruction_feature",
                             "head_sharing", "head_cap", "sinks"})
#: Options shown by ``repr`` and written by ``to_dict`` only when set, so that adding them left every existing
#: policy fingerprint (and the harness records keyed by it) and checkpoint file unchanged.
REPR_WHEN_SET = frozenset({"bam_window", "query_entropy_feature", "key_novelty_feature", "reconstruction_feature",
                           "head_sharing", "head_cap", "sinks"})


@dataclass
class NAMMConfig:
    """Every hyperparameter of a NAMM. The defaults are the published recipe (``namm_bam_i{1,2,3}``).

    Attributes:
        n_fft: STFT window length in queries (periodic Hann window of this length).
        hop: STFT hop in queries. Each memory step needs ``n_fft - hop`` carried samples per token and a
            query count that is a multiple of ``hop``.
        ema_decay: per-query EMA decay ``gamma``; one frame decays by ``gamma ** hop``.
        recency_dim: size of the sinusoidal age code (even; half sines, half cosines).
        recency_max_freq: base of the age code frequencies ``omega_k = recency_max_freq ** (-k / (dim/2))``.
        recency_offset: added to every age before encoding (0: the newest token has age 0).
        bam_hidden: head dimension of the BAM attention (q, k and v each have ``bam_heads * bam_hidden``).
        bam_heads: number of BAM attention heads.
        bam_bias: whether the three BAM linear layers have a bias.
        bam_window: 0 (the reference: a token's BAM attention covers every newer token) or, as an option that
            deviates from the reference, the number of tokens it covers: itself and the ``bam_window - 1``
            next newer ones, so the BAM costs ``O(T bam_window)`` instead of ``O(T^2)`` per step.
        selection: ``"per_layer"`` (the reference: every head of a batch row keeps as many tokens as its head
            with the most non-negative scores) or ``"per_head"`` (each head keeps exactly its non-negative ones).
        always_keep_newest: the newest token of every head is kept whatever its score.
        sinks: the first ``sinks`` real tokens of every head are kept whatever their scores (attention sinks, as
            StreamingLLM and KVzip keep them; 0: the reference, which has no such rule). A deviation, off by
            default.
        norm_eps: lower bound of the normalisation standard deviation.
        delay: memory-step cadence in tokens that the parameters were evolved with (a multiple of ``hop``).
        budget: ``None`` (threshold mode: a token is kept when its score is >= 0, so the cache size is the
            memory's own) or the budgeted mode's default mean budget: a fraction in ``(0, 1]`` of the tokens
            seen, or a token count per head; every head keeps its top-scored tokens (see ``NAMM.budget``).
        depth_knots: in budgeted mode, ``K`` learned logits (appended to the parameter vector) that spread
            the budget over the managed layers by relative depth (:mod:`namm.policies.allocation`); 0 gives
            every layer the same budget.
        spectral_norm: ``"global"`` (the reference: frozen statistics gathered on full-cache runs) or
            ``"per_head"`` (a deviation: log magnitudes standardised over each head's valid tokens at every
            step, which does not drift with the context length).
        key_norm_feature: append each token's key norm (log, standardised per head and step) to its features.
        query_entropy_feature: append the entropy of the token's own attention row as a query (averaged over
            the query heads of its KV head, divided by the log of the slots it could see), computed once at the
            memory step whose queries include it and standardised per head and step. Repeated text attends
            broadly to its earlier copies, new information sharply (docs/evolution.md, "Which attention signals
            mark a needle"). A deviation from the reference, off by default.
        key_novelty_feature: append one minus the cosine of the token's key with the mean key of its head's
            valid slots (KeyDiff's rule, Park et al., 2025, arXiv 2504.15364), standardised per head and step:
            repeated filler sits near the mean key, a unique fact away from it. A key-derived scalar, so the
            memory stays model-agnostic; a deviation from the reference, off by default.
        reconstruction_feature: append the attention a token receives while the model reconstructs the context
            (KVzip's signal, Kim et al., 2025, arXiv 2505.23416): before each memory step the engine runs "repeat
            the previous context" + the tokens since the previous step through the cache and takes them out again
            (:class:`~namm.policies.base.Probe`); each new token's feature is the log of the most attention any
            reconstruction query gives it (normalised over the sinks, its chunk and the probe), computed once and
            kept; not standardised, so that it compares across heads and steps as KVzip's score does. Still an
            attention-derived scalar, so the memory stays model-agnostic; it costs one extra forward pass over the
            context (``probe_seconds``). A deviation from the reference, off by default (docs/namm.md).
        head_sharing: budgeted mode only: each layer keeps ``budget x H`` tokens, its highest scores over all its
            KV heads together (AdaKV's and KVzip's rule), instead of ``budget`` per head; heads then hold different
            numbers of tokens. Off by default (docs/namm.md has the measurement that made the shipped memory use it).
        head_cap: with ``head_sharing``: no head keeps more than ``ceil(head_cap x budget)`` tokens (0: no cap; else
            >= 1, so the layer's total still fits). A cache whose heads keep different numbers of tokens stores them
            apart (:mod:`namm.store`), so the cap no longer bounds the storage; it only limits how unevenly a layer
            spends its budget. Off by default.
    """

    n_fft: int = 32
    hop: int = 16
    ema_decay: float = 0.99
    recency_dim: int = 8
    recency_max_freq: float = 50_000.0
    recency_offset: int = 0
    bam_hidden: int = 32
    bam_heads: int = 1
    bam_bias: bool = True
    bam_window: int = 0
    selection: str = "per_layer"
    always_keep_newest: bool = True
    sinks: int = 0
    norm_eps: float = 1e-7
    delay: int = 512
    budget: float | int | None = None
    depth_knots: int = 0
    spectral_norm: str = "global"
    key_norm_feature: bool = False
    query_entropy_feature: bool = False
    key_novelty_feature: bool = False
    reconstruction_feature: bool = False
    head_sharing: bool = False
    head_cap: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def __repr__(self) -> str:
        shown = [f for f in fields(self) if f.name not in REPR_WHEN_SET or getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_spec(self) -> int:
        """Number of one-sided STFT bins (17 by default)."""
        return self.n_fft // 2 + 1

    @property
    def carry(self) -> int:
        """Attention samples carried per token from one memory step to the next (16 by default)."""
        return self.n_fft - self.hop

    @property
    def feature_dim(self) -> int:
        """Size of a token's feature vector: recency code, spectrum, optional key norm and query entropy (25 by
        default)."""
        return (self.recency_dim + self.n_spec + int(self.key_norm_feature) + int(self.query_entropy_feature)
                + int(self.key_novelty_feature) + int(self.reconstruction_feature))

    @property
    def frame_decay(self) -> float:
        """EMA decay per STFT frame, ``ema_decay ** hop``."""
        return self.ema_decay**self.hop

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`NammError` naming the first invalid field."""
        ints = ("n_fft", "hop", "recency_dim", "recency_offset", "bam_hidden", "bam_heads", "bam_window", "delay",
                "depth_knots", "sinks")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise NammError(f"NAMMConfig.{name} must be an integer, got {v!r}.")
        for name in ("ema_decay", "recency_max_freq", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise NammError(f"NAMMConfig.{name} must be a finite number, got {v!r}.")
        for name in ("bam_bias", "always_keep_newest", "key_norm_feature", "query_entropy_feature",
                     "key_novelty_feature", "reconstruction_feature", "head_sharing"):
            if not isinstance(getattr(self, name), bool):
                raise NammError(f"NAMMConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        if self.n_fft < 2 or self.n_fft % 2:
            raise NammError(f"NAMMConfig.n_fft must be an even number >= 2, got {self.n_fft}.")
        if not 1 <= self.hop <= self.n_fft:
            raise NammError(f"NAMMConfig.hop must be in [1, n_fft={self.n_fft}], got {self.hop}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise NammError(f"NAMMConfig.ema_decay must be in (0, 1), got {self.ema_decay}.")
        if self.recency_dim < 0 or self.recency_dim % 2:
            raise NammError(f"NAMMConfig.recency_dim must be an even number >= 0, got {self.recency_dim}.")
        if self.recency_max_freq <= 0:
            raise NammError(f"NAMMConfig.recency_max_freq must be positive, got {self.recency_max_freq}.")
        if self.recency_offset < 0:
            raise NammError(f"NAMMConfig.recency_offset must be >= 0, got {self.recency_offset}.")
        if self.sinks < 0:
            raise NammError(f"NAMMConfig.sinks must be >= 0 (first tokens always kept), got {self.sinks}.")
        if self.bam_hidden < 1 or self.bam_heads < 1:
            raise NammError(
                f"NAMMConfig.bam_hidden and bam_heads must be >= 1, got {self.bam_hidden} and {self.bam_heads}."
            )
        if self.bam_window < 0:
            raise NammError(f"NAMMConfig.bam_window must be 0 (every newer token) or >= 1, got {self.bam_window}.")
        if self.selection not in SELECTION_MODES:
            raise NammError(f"NAMMConfig.selection must be one of {SELECTION_MODES}, got {self.selection!r}.")
        if self.norm_eps <= 0:
            raise NammError(f"NAMMConfig.norm_eps must be positive, got {self.norm_eps}.")
        if self.spectral_norm not in SPECTRAL_NORMS:
            raise NammError(f"NAMMConfig.spectral_norm must be one of {SPECTRAL_NORMS}, got {self.spectral_norm!r}.")
        if self.depth_knots < 0:
            raise NammError(f"NAMMConfig.depth_knots must be >= 0, got {self.depth_knots}.")
        check_budget(self.budget, "NAMMConfig.budget")
        cap = self.head_cap
        number = not isinstance(cap, bool) and isinstance(cap, (int, float)) and math.isfinite(cap)
        if not number or (cap != 0 and cap < 1):
            raise NammError(f"NAMMConfig.head_cap must be 0 (no cap) or a number >= 1, got {cap!r}.")
        if cap and not self.head_sharing:
            raise NammError("NAMMConfig.head_cap caps the heads of a shared budget: set NAMMConfig.head_sharing too.")
        if self.head_sharing and self.budget is None:
            raise NammError("NAMMConfig.head_sharing needs the budgeted mode: set NAMMConfig.budget too.")
        if self.depth_knots and self.budget is None:
            raise NammError("NAMMConfig.depth_knots needs the budgeted mode: set NAMMConfig.budget too.")
        if self.delay < self.hop or self.delay % self.hop:
            raise NammError(f"NAMMConfig.delay must be a positive multiple of hop={self.hop}, got {self.delay}.")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Every field, except the options of :data:`REPR_WHEN_SET` left at their default (checkpoint files stay
        as they were; :meth:`from_dict` gives them their defaults back)."""
        data = asdict(self)
        for f in fields(self):
            if f.name in REPR_WHEN_SET and data[f.name] == f.default:
                del data[f.name]
        return data

    @classmethod
    def from_dict(cls, data: Any, *, strict: bool = True) -> NAMMConfig:
        """Build a config from a dict.

        Unknown fields are always refused; missing fields are refused when ``strict`` (as for checkpoints),
        otherwise they take their defaults.
        """
        if not isinstance(data, dict):
            raise NammError(f"A NAMM config must be a JSON object, got {type(data).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise NammError(f"Unknown NAMM config field(s): {', '.join(unknown)}. Known: {', '.join(sorted(names))}.")
        missing = sorted(names - set(data) - OPTIONAL_FIELDS)
        if strict and missing:
            raise NammError(f"Missing NAMM config field(s): {', '.join(missing)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, strict: bool = True) -> NAMMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise NammError(f"A NAMM config is not valid JSON: {e}.") from e
        return cls.from_dict(data, strict=strict)


def check_budget(budget: object, what: str) -> None:
    """Raise unless ``budget`` is None, a fraction in ``(0, 1]`` or a token count ``>= 1``."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise NammError(f"{what} must be a fraction in (0, 1] or a token count, got {budget!r}.")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise NammError(f"{what}: a fractional budget must be in (0, 1], got {budget}.")
    if isinstance(budget, int) and budget < 1:
        raise NammError(f"{what}: a token budget must be at least 1, got {budget}.")


__all__ = ["SELECTION_MODES", "SPECTRAL_NORMS", "NAMMConfig", "check_budget"]
