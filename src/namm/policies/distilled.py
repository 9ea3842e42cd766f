"""KVzip's ranking without its probe: a linear scorer on what the cache already holds, fitted to KVzip's scores.

KVzip (:class:`~namm.policies.peers.KVzip`) finds the tokens a context needs by making the model repeat it, one
extra forward pass over the context. KVzap (arXiv 2601.07891) and Fast KVzip (arXiv 2601.17668) distil that
score into a small per-token predictor. :class:`Distilled` does the same on the cached keys and values, so it
needs no hook and no probe: per layer and KV head, ``score = w . features(token) + b`` with the features the
token's value vector and its key's RoPE-invariant pair norms (:func:`token_features`). The weights are fitted
by ``benchmarks/distil_kvzip.py`` (ridge regression on the log of KVzip's score, on training prompts only) and
stored as safetensors plus JSON (:class:`DistilledScorer`). They are specific to one model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from namm.atomic import atomic_write_bytes, atomic_write_json
from namm.errors import NammError
from namm.policies.base import BudgetPolicy, MemoryStep, StepRequest, protect, sink_mask
from namm.policies.selection import layer_shared_keep

#: Where named scorers ship, ``<name>/scorer.safetensors`` + ``<name>/scorer.json``.
SCORER_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def token_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, D + D/2)`` float32 per-token features: the value vector, then the norm of each pair of key
    dimensions that RoPE rotates together (``i`` and ``i + D/2``, transformers' ``rotate_half`` layout), which
    does not depend on the token's position.

    Args:
        keys: ``(B, H, T, D)`` cached keys (post-RoPE).
        values: ``(B, H, T, D)`` cached values.
    """
    k = keys.float()
    half = k.shape[-1] // 2
    pair_norms = torch.sqrt(k[..., :half] ** 2 + k[..., half : 2 * half] ** 2)
    return torch.cat([values.float(), pair_norms], dim=-1)


@dataclass(frozen=True)
class DistilledScorer:
    """Weights per (layer, KV head). Linear: ``weight`` ``(L, H, F)`` and ``bias`` ``(L, H)``. With a hidden layer
    (KVzap's MLP variant), ``hidden_weight`` ``(L, H, F, M)`` and ``hidden_bias`` ``(L, H, M)`` come first, a GELU
    between, and ``weight`` is ``(L, H, M)``. ``meta`` says how they were fitted (model, prompts, fit quality)."""

    weight: torch.Tensor
    bias: torch.Tensor
    meta: dict = field(default_factory=dict, compare=False)
    hidden_weight: torch.Tensor | None = None
    hidden_bias: torch.Tensor | None = None

    @property
    def num_features(self) -> int:
        return (self.hidden_weight if self.hidden_weight is not None else self.weight).shape[2]

    def score(self, layer_idx: int, features: torch.Tensor) -> torch.Tensor:
        """``(B, H, T)`` predicted log KVzip score of ``(B, H, T, F)`` features at layer ``layer_idx``."""
        if layer_idx >= self.weight.shape[0] or features.shape[1] != self.weight.shape[1] or \
                features.shape[-1] != self.num_features:
            raise NammError(
                f"This distilled scorer was fitted for {self.weight.shape[0]} layers x {self.weight.shape[1]} KV "
                f"heads x {self.num_features} features (model {self.meta.get('model', '?')!r}); the model "
                f"gives layer {layer_idx} with {features.shape[1]} heads x {features.shape[-1]} features. Fit one "
                "for this model with benchmarks/distil_kvzip.py."
            )
        x = features
        if self.hidden_weight is not None:
            x = torch.einsum("bhtf,hfm->bhtm", x, self.hidden_weight[layer_idx].to(x))
            x = torch.nn.functional.gelu(x + self.hidden_bias[layer_idx].to(x)[None, :, None])
        w = self.weight[layer_idx].to(x)
        return torch.einsum("bhtf,hf->bht", x, w) + self.bias[layer_idx].to(x)[None, :, None]

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}
        if self.hidden_weight is not None:
            tensors |= {"hidden_weight": self.hidden_weight.contiguous(), "hidden_bias": self.hidden_bias.contiguous()}
        atomic_write_bytes(out / "scorer.safetensors", save(tensors))
        atomic_write_json(out / "scorer.json", self.meta)
        return out

    @classmethod
    def load(cls, name_or_dir: str | Path) -> DistilledScorer:
        return _load(str(name_or_dir))

    @property
    def digest(self) -> str:
        """A short fingerprint of the weights."""
        parts = [self.weight, self.bias]
        if self.hidden_weight is not None:
            parts += [self.hidden_weight, self.hidden_bias]
        total = float(sum(p.double().abs().sum() for p in parts))
        return f"{tuple(self.weight.shape)}:{total:.6g}"


@lru_cache(maxsize=8)
def _load(name_or_dir: str) -> DistilledScorer:
    path = Path(name_or_dir)
    if not (path / "scorer.safetensors").is_file():
        path = SCORER_DIR / name_or_dir
    if not (path / "scorer.safetensors").is_file():
        shipped = sorted(p.name for p in SCORER_DIR.glob("*") if (p / "scorer.safetensors").is_file())
        raise NammError(f"No distilled scorer at {name_or_dir!r}: give a directory holding scorer.safetensors "
                        f"(benchmarks/distil_kvzip.py writes one) or one of the shipped: {shipped or 'none'}.")
    tensors = load_file(str(path / "scorer.safetensors"))
    meta_file = path / "scorer.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    hidden = tensors.get("hidden_weight")
    return DistilledScorer(tensors["weight"].float(), tensors["bias"].float(), meta,
                           None if hidden is None else hidden.float(),
                           None if hidden is None else tensors["hidden_bias"].float())


@dataclass
class Distilled(BudgetPolicy):
    """KVzip's ranking predicted from each token's value and key pair norms (no probe: the full cache's cost).

    Args:
        budget: tokens (or fraction) kept per head, on average over the layer's heads.
        scorer: a shipped scorer's name or a directory written by :meth:`DistilledScorer.save`.
        sinks: first real tokens always kept.
        per_head: False (default): each layer keeps ``budget x H`` tokens, its best predicted scores over all
            heads (as :class:`~namm.policies.peers.KVzip`); True: ``budget`` per head.
    """

    name = "distilled"
    request = StepRequest()
    scorer: str = "smollm2-135m-distilled"
    sinks: int = 4
    per_head: bool = False

    @property
    def shares_heads(self) -> bool:  # type: ignore[override]
        return not self.per_head

    @classmethod
    def shipped(cls) -> bool:
        """Whether the default scorer ships with the package."""
        return (SCORER_DIR / cls.scorer / "scorer.safetensors").is_file()

    def score(self, step: MemoryStep) -> torch.Tensor:
        predicted = DistilledScorer.load(self.scorer).score(step.layer_idx, token_features(step.keys, step.values))
        return protect(predicted, sink_mask(step, self.sinks))

    def keep(self, step: MemoryStep, scores: torch.Tensor) -> torch.Tensor:
        return layer_shared_keep(scores, step.valid, self.budget_tokens(step), self.per_head)

    def fingerprint(self) -> str:
        return f"{self!r} weights {DistilledScorer.load(self.scorer).digest}"
