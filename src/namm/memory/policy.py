"""The NAMM policy: features + BAM scores + threshold selection, with safetensors checkpoints.

Two ways to select. Budgeted (``NAMM(budget=0.5)`` or a checkpoint whose config has a budget): every head
keeps its ``budget`` top-scored tokens at every memory step, the budget being spread over the layers by
the learned depth allocation when the config has ``depth_knots`` (the mean over layers is exactly the
budget); the cache size is then the user's, whatever the scores. Threshold (spec section 4, the
reference): a score ``>= 0`` is kept, the newest token of every head is always kept and
invalid slots are never kept. ``selection="per_head"`` keeps exactly that set per head.
``selection="per_layer"`` is the reference rule: every head keeps as many tokens as the head with the most
kept tokens, taking its highest-scored ones. Deliberate deviation: that count is the maximum over the heads
of each batch row, not over the whole batch (the reference always runs batch size 1, where both agree), so
batch rows (different prompts, or different population members) never influence each other's caches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from namm.atomic import atomic_write_bytes, atomic_write_text
from namm.errors import NammError
from namm.memory.bam import bam_scores, param_count, unflatten
from namm.memory.config import NAMMConfig, check_budget
from namm.memory.features import (
    CARRY_KEY,
    EMA_KEY,
    RECONSTRUCTION_KEY,
    FeatureNormaliser,
    attention_feature_indices,
    newest_position,
    step_features,
)
from namm.policies import register_policy
from namm.policies.allocation import HeadAllocation
from namm.policies.base import (
    ALL_QUERIES,
    MemoryStep,
    Policy,
    StepRequest,
    budget_tokens,
    exceeds,
    head_tokens,
    sink_mask,
)
from namm.policies.peers import reconstruction_ids, reconstruction_scores
from namm.policies.selection import head_adaptive_keep, head_cap_tokens, threshold_keep, top_k_keep

#: First tokens that take part in every chunk's reconstruction softmax (KVzip's sinks).
RECONSTRUCTION_SINKS = 4

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "namm-policy"
FORMAT_VERSION = 1
#: Folder of the checkpoints bundled with the package (``namm/checkpoints/<name>/``).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def bundled_checkpoints() -> list[str]:
    """Names of the checkpoints shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def newest_mask(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, H, T)`` bool: the valid slot with the largest position of every head."""
    return valid & (positions == newest_position(positions, valid))


def _as_vector(values: Any, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if t.shape != (n,):
        raise NammError(f"{what} must be a vector of {n} values, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise NammError(f"{what} contains NaN or infinite values.")
    return t.clone()


@dataclass(eq=False)
class NAMM(Policy):
    """Neural Attention Memory Model policy.

    Attributes:
        config: hyperparameters (:class:`NAMMConfig`).
        params: flat parameter vector ``(n,)`` (zeros by default: every token is kept).
        collect_stats: statistics-collection mode: every memory step merges the EMA features of the valid
            tokens into the normalisation statistics and keeps every token.
        budget: budgeted mode: the mean budget per head, a fraction in ``(0, 1]`` of the tokens seen or a
            token count; ``None`` takes the config's (``None`` there too: threshold mode).
        head_allocation: budgeted mode: a per-head allocation for one model (a logit per layer and KV head,
            fitted to retrieval heads); it replaces the depth allocation on that model and is saved with the
            checkpoint. Loading a checkpoint for another model shape: ``from_pretrained(..., heads=False)``.
    """

    name: ClassVar[str] = "namm"

    config: NAMMConfig = field(default_factory=NAMMConfig)
    params: torch.Tensor | None = field(default=None, repr=False)
    collect_stats: bool = False
    budget: float | int | None = None
    head_allocation: HeadAllocation | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, NAMMConfig):
            raise NammError(f"NAMM: config must be a NAMMConfig, got {type(self.config).__name__}.")
        check_budget(self.budget, "NAMM budget")
        n = self.n_params
        self.params = torch.zeros(n) if self.params is None else _as_vector(self.params, n, "NAMM parameters")
        self.normaliser = FeatureNormaliser(self.config.n_spec, self.config.norm_eps)
        self.population: torch.Tensor | None = None
        self._request: tuple[tuple, StepRequest] | None = None

    @property
    def request(self) -> StepRequest:  # type: ignore[override]
        """Every query's attention, streamed, when the scorer reads an attention feature (:meth:`reads_attention`);
        with ``reconstruction_feature`` also KVzip's reconstruction probe. Cached per parameter tensor (replace
        the parameters with :meth:`set_params` / :meth:`set_population`, not in place)."""
        key = (self.params, self.population, self.collect_stats)
        if self._request is None or any(a is not b for a, b in zip(self._request[0], key, strict=True)):
            attention = self.reads_attention()
            self._request = key, StepRequest(queries=ALL_QUERIES if attention else None, stream=attention,
                                             probe=self.config.reconstruction_feature)
        return self._request[1]

    def reads_attention(self) -> bool:
        """Whether the scores depend on the attention features (spectrogram, query entropy) for some parameter row.

        A feature is read when its weight in the linear head or in the BAM's ``qkv`` projection is non-zero:
        with both zero it reaches no score (``h = z (1 + m) + r`` meets the head weight only). When no row reads
        one, memory steps skip the attention weights and the spectrogram entirely (the scores are unchanged); in
        statistics-collection mode the features are always computed.
        """
        if self.collect_stats:
            return True
        params = self.population if self.population is not None else self.params
        w = unflatten(params, self.config)
        d = self.config.feature_dim
        head = w["head_weight"].reshape(-1, d)  # (rows, d)
        qkv = w["qkv_weight"].reshape(-1, d, w["qkv_weight"].shape[-1])  # (rows, d, 3 hidden)
        used = (head != 0) | (qkv != 0).any(-1)
        return bool(used[:, attention_feature_indices(self.config)].any())

    def probe_ids(self, tokenizer, chunk: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """KVzip's "repeat the previous context" prompt + the chunk (``reconstruction_feature`` only)."""
        return reconstruction_ids(tokenizer, chunk, before)

    # ------------------------------------------------------------------ parameters
    @property
    def n_params(self) -> int:
        return param_count(self.config)

    def get_params(self) -> torch.Tensor:
        """A copy of the ``(n,)`` float32 parameter vector."""
        return self.params.clone()

    def set_params(self, vector: Any) -> None:
        """Replace the parameter vector (``(n,)``; tensor, array or list)."""
        self.params = _as_vector(vector, self.n_params, "NAMM parameters")

    def set_population(self, matrix: Any) -> None:
        """Population mode: batch row ``b`` of every step is scored with ``matrix[b]`` (``(P, n)``)."""
        t = torch.as_tensor(matrix, dtype=torch.float32).detach().cpu()
        if t.dim() != 2 or t.shape[1] != self.n_params or t.shape[0] < 1:
            raise NammError(f"A NAMM population must have shape (members, {self.n_params}), got {tuple(t.shape)}.")
        if not torch.isfinite(t).all():
            raise NammError("The NAMM population contains NaN or infinite values.")
        self.population = t.clone()

    def clear_population(self) -> None:
        """Back to one parameter vector for every batch row."""
        self.population = None

    @property
    def active_budget(self) -> float | int | None:
        """The budget in force: ``budget``, else the config's, else ``None`` (threshold mode)."""
        return self.budget if self.budget is not None else self.config.budget

    def depth_logits(self) -> torch.Tensor | None:
        """``(K,)`` (or ``(P, K)`` in population mode) allocation logits, ``None`` without ``depth_knots``."""
        k = self.config.depth_knots
        if not k:
            return None
        params = self.population if self.population is not None else self.params
        return params[..., -k:]

    # ------------------------------------------------------------------ statistics
    def freeze_stats(self) -> None:
        """Freeze the normalisation statistics and leave statistics-collection mode."""
        self.normaliser.freeze()
        self.collect_stats = False

    # ------------------------------------------------------------------ policy interface
    def score(self, step: MemoryStep) -> torch.Tensor:
        """``(B, H, T)`` BAM scores (``-inf`` for invalid slots); updates ``step.state`` EMA and carry."""
        if self.collect_stats and self.normaliser.frozen:
            raise NammError("NAMM: collect_stats is on but the normalisation statistics are frozen.")
        params = self.params
        if self.population is not None:
            rows, batch = self.population.shape[0], step.valid.shape[0]
            if rows != batch:
                raise NammError(
                    f"NAMM population has {rows} members but the batch has {batch} rows; "
                    "run one population member per batch row."
                )
            params = self.population
        if self.config.reconstruction_feature and (step.probe is not None or RECONSTRUCTION_KEY not in step.state):
            # a step without a probe reads the scores its state already holds (a replay of a recorded run,
            # namm.evolution.replay); the first step of a run without namm's engine has neither and says so
            reconstruction_scores(step, RECONSTRUCTION_SINKS, RECONSTRUCTION_KEY, "A NAMM with reconstruction_feature")
        attention = self.request.attention
        features, ema, carry = step_features(
            step,
            self.config,
            self.normaliser,
            step.state.get(EMA_KEY),
            step.state.get(CARRY_KEY),
            update_stats=self.collect_stats,
            attention=attention,
        )
        if attention:
            step.state[EMA_KEY] = ema
            step.state[CARRY_KEY] = carry
        return bam_scores(features, step.valid, params, self.config, step.positions)

    def keep(self, step: MemoryStep, scores: torch.Tensor) -> torch.Tensor:
        """``(B, H, T)`` keep mask: the budgeted top scores, or the non-negative ones (+ the newest token and the
        first ``config.sinks`` tokens)."""
        if self.collect_stats:
            return step.valid.clone()
        always = newest_mask(step.positions, step.valid) if self.config.always_keep_newest else None
        if self.config.sinks:
            sinks = sink_mask(step, self.config.sinks)
            always = sinks if always is None else always | sinks
        budget = self.active_budget
        if budget is not None:
            lifted = scores.masked_fill(always, float("inf")) if always is not None else scores
            if self.config.head_sharing:
                return head_adaptive_keep(lifted, step.valid, self.budget_tokens(step), cap=self.config.head_cap)
            return top_k_keep(lifted, step.valid, self.budget_tokens(step))
        per_layer = self.config.selection == "per_layer"
        return threshold_keep(scores, step.valid, per_layer=per_layer, always=always)

    def over_budget(self, step: MemoryStep) -> bool:
        """Budgeted mode: whether a head holds more than its budget (then a step runs at the end of the prompt,
        so the budget holds before the answer). Threshold mode keeps its own cadence: False."""
        if self.active_budget is None or self.collect_stats:
            return False
        tokens = self.budget_tokens(step)
        cap = self.config.head_cap
        return exceeds(step, tokens, shared=self.config.head_sharing) or bool(
            cap and exceeds(step, head_cap_tokens(tokens, cap)))

    def budget_tokens(self, step: MemoryStep) -> torch.Tensor:
        """``(B,)`` tokens per head of this layer in budgeted mode (its share under the depth allocation), or
        ``(B, H)`` per head under a head allocation."""
        if self.head_allocation is not None:
            return head_tokens(self.head_allocation.tensor(), self.active_budget, step, self.head_allocation.floor)
        return budget_tokens(self.active_budget, step, self.depth_logits())

    def fingerprint(self) -> str:
        """The config and options plus a digest of the weights, the normalisation statistics and any population."""
        digest = hashlib.sha1()
        alloc = self.head_allocation
        heads = None if alloc is None else torch.cat(
            [alloc.tensor().reshape(-1), torch.tensor([alloc.floor], dtype=torch.float64)])
        for t in (self.params, self.normaliser.mu, self.normaliser.sigma, self.population, heads):
            if t is not None:
                digest.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        return f"{self!r} weights={digest.hexdigest()[:16]}"

    def describe(self) -> str:
        b = self.active_budget
        how = f"{self.config.selection} selection" if b is None else (
            f"budget {b:.0%}" if isinstance(b, float) else f"budget {b} tokens") + (
            f", fitted head allocation ({self.head_allocation})" if self.head_allocation is not None else
            f", learned depth allocation ({self.config.depth_knots} knots)" if self.config.depth_knots else "")
        if b is not None and self.config.head_sharing:
            how += ", each layer's budget shared by its heads"
            if self.config.head_cap:
                how += f" (at most {self.config.head_cap:g}x the budget per head)"
        spectral = ("per-head standardised spectrogram" if self.config.spectral_norm == "per_head"
                    else self.normaliser.describe())
        if self.config.sinks:
            how += f", the first {self.config.sinks} tokens always kept"
        if not self.config.always_keep_newest:
            how += ", the newest token not forced"
        parts = [f"{self.n_params:,} params", how, spectral]
        if self.config.reconstruction_feature:
            parts.append("reconstruction-probe feature")
        if self.population is not None:
            parts.append(f"population of {self.population.shape[0]}")
        if self.collect_stats:
            parts.append("collecting statistics (keeps every token)")
        return f"{self.name} ({', '.join(parts)})"

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (params, normalisation mu/sigma/count) to ``directory``.

        Each file is replaced atomically (never half-written), the weights first; other files in ``directory``
        are left alone. To replace a whole checkpoint folder at once, fill it with
        :func:`namm.atomic.atomic_fill_dir` (the evolution's checkpoints do).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "normalisation_frozen": self.normaliser.frozen,
        }
        if self.head_allocation is not None:
            meta["head_floor"] = self.head_allocation.floor
        tensors = {
            "params": self.params.float().contiguous(),
            "norm_mu": self.normaliser.mu.contiguous(),
            "norm_sigma": self.normaliser.sigma.contiguous(),
            "norm_count": torch.tensor(self.normaliser.count, dtype=torch.float64),
        }
        if self.head_allocation is not None:
            tensors["head_logits"] = self.head_allocation.tensor().contiguous()
        atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT}))
        atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, budget: float | int | None = None, heads: bool = True) -> NAMM:
        """Load a checkpoint folder, or a bundled checkpoint by name (e.g. ``"smollm2-135m"``).

        ``budget`` overrides the checkpoint's budget (budgeted mode); a threshold checkpoint given a budget
        keeps its top-scored tokens instead of its non-negative ones. ``heads=False`` leaves out the
        checkpoint's per-head allocation (fitted to one model's heads) and uses its depth allocation instead:
        the memory for another model (zero-shot transfer).
        """
        path = _resolve(name_or_dir)
        meta = _read_meta(path / CONFIG_FILE)
        config_file = path / CONFIG_FILE
        try:
            config = NAMMConfig.from_dict(meta["config"], strict=True)
        except NammError as e:
            raise NammError(f"{config_file}: {e}") from e
        frozen = meta["normalisation_frozen"]
        if not isinstance(frozen, bool):
            raise NammError(f"{config_file}: 'normalisation_frozen' must be true or false.")
        tensors = _read_tensors(path / WEIGHTS_FILE)
        n, k = param_count(config), config.n_spec
        expected = {"params": (n,), "norm_mu": (k,), "norm_sigma": (k,), "norm_count": ()}
        weights_file = path / WEIGHTS_FILE
        head_logits = tensors.pop("head_logits", None)
        if set(tensors) != set(expected):
            raise NammError(f"{weights_file}: expected tensors {sorted(expected)}, found {sorted(tensors)}.")
        head_allocation = None
        if head_logits is not None and heads:
            floor = meta.get("head_floor", 0.0)
            if head_logits.dim() != 2 or not torch.isfinite(head_logits).all() or not isinstance(floor, (int, float)):
                raise NammError(f"{weights_file}: 'head_logits' must be a finite (layers, heads) table and "
                                f"{CONFIG_FILE}'s 'head_floor' a number.")
            head_allocation = HeadAllocation(tuple(tuple(r) for r in head_logits.tolist()), float(floor))
        for key, shape in expected.items():
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise NammError(
                    f"{weights_file}: tensor {key!r} has shape {tuple(t.shape)}, but the config in "
                    f"{CONFIG_FILE} needs {shape}."
                )
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise NammError(f"{weights_file}: tensor {key!r} must hold finite floating-point values.")
        policy = cls(config=config, params=tensors["params"], budget=budget, head_allocation=head_allocation)
        try:
            policy.normaliser.load(tensors["norm_mu"], tensors["norm_sigma"], float(tensors["norm_count"]), frozen)
        except NammError as e:
            raise NammError(f"{weights_file}: {e}") from e
        return policy


register_policy(NAMM)


def _resolve(name_or_dir: str | Path) -> Path:
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NammError(f"{path} is a file; pass the checkpoint folder holding {CONFIG_FILE} and {WEIGHTS_FILE}.")
    name = str(name_or_dir)
    if "/" not in name and "\\" not in name and (BUNDLED_DIR / name / CONFIG_FILE).is_file():
        return BUNDLED_DIR / name
    available = bundled_checkpoints()
    listed = ", ".join(available) if available else "none are installed in this version of namm"
    raise NammError(
        f"No NAMM checkpoint {name!r}: it is neither a folder nor a bundled checkpoint name "
        f"(bundled checkpoints: {listed})."
    )


def _read_meta(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise NammError(f"{file}: missing; a NAMM checkpoint folder needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NammError(f"{file}: not valid JSON ({e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NammError(f'{file}: not a NAMM policy checkpoint (expected "format": "{FORMAT}").')
    if meta.get("format_version") != FORMAT_VERSION:
        raise NammError(
            f"{file}: unsupported format_version {meta.get('format_version')!r} (this namm reads {FORMAT_VERSION})."
        )
    missing = [k for k in ("config", "normalisation_frozen") if k not in meta]
    if missing:
        raise NammError(f"{file}: missing field(s) {', '.join(missing)}.")
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise NammError(f"{file}: missing; a NAMM checkpoint folder needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NammError(f"{file}: cannot read the safetensors file ({e}).") from e


__all__ = ["NAMM", "bundled_checkpoints", "newest_mask"]
