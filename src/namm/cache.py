"""A transformers ``Cache`` whose full-attention layers hold a variable number of tokens per KV head.

Each managed layer (:class:`EvictingLayer`) stores, per batch row and KV head, the kept tokens' keys
and values in position order, each token's original absolute position, and a validity mask. After an
eviction the storage is compacted to the longest head; shorter heads are padded with invalid slots
(reported by :meth:`MemoryCache.padding_fraction`). Keys are cached post-RoPE, so evicting tokens does
not move anyone's position; new tokens keep absolute positions (``get_seq_length`` is the number of
tokens processed, not the number stored).

Sliding-window layers (e.g. 15 of Gemma 3's 18 layers) are left to transformers' own
``DynamicSlidingWindowLayer``, which already bounds them; only global layers are managed.

Memory steps run inside the attention call of each layer (see :mod:`namm.attention`), whenever the
layer's absolute token count reaches or crosses a multiple of ``delay``: the policy scores the layer's
cached tokens, keeps some, and the layer gathers its storage, positions and per-token policy state.

Probes (:meth:`MemoryCache.probe`): tokens run through the cache and taken out again afterwards, so that the
cache is as before; no memory step runs meanwhile. The engine uses them to teacher-force a gold answer
(:mod:`namm.scoring`) and, for a policy with ``needs_probe`` (KVzip), to run its reconstruction prompt before
a memory step: each layer then keeps the probe's queries and keys and hands them to the step as a
:class:`~namm.policies.base.Probe`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs

from namm.attention import attention_modules, check_nothing_pending, clear_pending, enable, hand_over
from namm.errors import NammError
from namm.policies.base import ALL_QUERIES, MemoryStep, Policy, Probe

_ATTENTION_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32 logits per block of queries at a memory step


def _lower_triangle(n: int, device) -> torch.Tensor:
    """``(n, n)`` bool, True on and below the diagonal."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward takes the cache: ``cache`` (newer transformers 5 releases,
    where ``past_key_values`` is deprecated) or ``past_key_values``."""
    import inspect  # noqa: PLC0415

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class StepRecord:
    """What one memory step of one layer did. ``kept``: ``(B, H)`` tokens kept per row and head."""

    layer_idx: int
    n_seen: int
    kept: torch.Tensor
    before: torch.Tensor
    seconds: float


@dataclass
class CacheStats:
    """Running statistics of a :class:`MemoryCache`."""

    steps: list[StepRecord] = field(default_factory=list)
    peak_bytes: int = 0
    memory_seconds: float = 0.0


class EvictingLayer(DynamicLayer):
    """Per-head evicting storage for one full-attention layer.

    Tensors (``B`` rows, ``H`` KV heads, ``T`` slots, ``D`` head dim):
    ``keys``/``values`` ``(B, H, T, D)``, ``positions`` ``(B, H, T)`` int64, ``valid`` ``(B, H, T)`` bool,
    ``state[name]`` ``(B, H, T, ...)`` per-token policy state, ``queries`` ``(B, H_q, Q, D)`` the recent
    queries a policy asked for, ``real`` ``(B, n_seen)`` bool which absolute positions are real tokens.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, owner: MemoryCache):
        super().__init__()
        self.layer_idx = layer_idx
        self.owner = owner
        self.n_seen = 0
        self.last_step = 0
        self.dense = True  # slot i holds position i and every slot is valid: plain SDPA applies
        self.padded = False  # some processed token was left padding
        # Slot metadata; None while the layer is dense (slot i = position i, all valid, no padding), in which
        # case the properties below derive it on demand and decoding skips three concatenations per token.
        self._positions: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.queries: torch.Tensor | None = None
        self.softcap: float | None = None
        self.bytes = 0
        self.probe_queries: torch.Tensor | None = None  # (B, H_q, P, D) while a capturing probe runs
        self.probe: Probe | None = None  # the last captured probe, consumed by the next memory step

    # --- transformers Cache layer API -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)

    @property
    def positions(self) -> torch.Tensor:
        if self._positions is None:
            b, h, t = self.keys.shape[:3]
            self._positions = torch.arange(t, device=self.device).expand(b, h, t).clone()
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor) -> None:
        self._positions = value

    @property
    def valid(self) -> torch.Tensor:
        if self._valid is None:
            self._valid = torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.device)
        return self._valid

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._valid = value

    @property
    def real(self) -> torch.Tensor:
        if self._real is None:
            self._real = torch.ones(self.keys.shape[0], self.n_seen, dtype=torch.bool, device=self.device)
        return self._real

    @real.setter
    def real(self, value: torch.Tensor) -> None:
        self._real = value

    def _forget_dense_metadata(self) -> None:
        """Back to derived metadata (only valid while the layer is dense)."""
        self._positions = self._valid = self._real = None

    def kept_counts(self) -> torch.Tensor:
        """``(B, H)`` valid tokens per row and head."""
        if self._valid is None:
            return torch.full(self.keys.shape[:2], self.keys.shape[2], dtype=torch.long, device=self.device)
        return self._valid.sum(dim=-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, H, Q, D)`` new keys/values; return the whole storage for the attention call."""
        check_nothing_pending()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if q == 1 and self.owner.auto_end_prompt:  # decoding starts (e.g. inside model.generate)
            self.owner.end_prompt()
        if self._positions is not None:
            new_pos = torch.arange(self.n_seen, self.n_seen + q, device=self.device)
            self._positions = torch.cat([self._positions, new_pos.expand(b, h, q)], dim=-1)
        if self._valid is not None:
            self._valid = torch.cat([self._valid, self._valid.new_ones(b, h, q)], dim=-1)
        if self._real is not None:
            self._real = torch.cat([self._real, self._real.new_ones(b, q)], dim=-1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        for name, tensor in self.state.items():
            pad = tensor.new_zeros(b, h, q, *tensor.shape[3:])
            self.state[name] = torch.cat([tensor, pad], dim=2)
        self.n_seen += q
        self.owner._account(self)
        hand_over(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens processed so far (absolute), which is what transformers derives positions from."""
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks are built over absolute positions; :mod:`namm.attention` maps them onto the slots."""
        return self.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.owner)

    def crop(self, tokens_to_remove: int) -> None:
        raise NammError("A namm cache cannot be cropped (evicted tokens cannot be restored).")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def _index_batch(self, idx: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = idx.to(self.device)
        self.keys, self.values = self.keys[idx], self.values[idx]
        if self.dense:
            self._forget_dense_metadata()
        else:
            self.positions, self.valid, self.real = self.positions[idx], self.valid[idx], self.real[idx]
        self.state = {k: v[idx] for k, v in self.state.items()}
        if self.queries is not None:
            self.queries = self.queries[idx]
        self.owner._account(self)

    # --- called by namm.attention --------------------------------------------------------------
    def observe_padding(self, attention_mask: torch.Tensor | None, q: int) -> None:
        """Mark this call's left-padding tokens as not real and their slots invalid.

        ``attention_mask`` is the 4-D mask transformers built over absolute positions, ``(B, 1, Q, n_seen)``
        (bool, or additive float), or ``None`` when there is no padding. Its last query row sees every
        real earlier token.
        """
        if attention_mask is None or attention_mask.dim() != 4:
            return
        row = attention_mask[:, 0, -1, self.n_seen - q : self.n_seen]
        real = row if row.dtype == torch.bool else row == 0
        if real.shape[0] != self.real.shape[0]:
            real = real.expand(self.real.shape[0], -1)
        if bool(real.all()):
            return
        self.real[:, self.n_seen - q :] = real
        self.valid[:, :, -q:] &= real[:, None, :]
        self.dense = False
        self.padded = True

    def slot_mask(self, q: int) -> torch.Tensor:
        """``(B, H, Q, T)`` bool: which slots each of this call's ``q`` queries may attend to.

        This call's tokens are the last ``q`` slots (appended in order), so causality only concerns them;
        every older slot is visible wherever it is valid.
        """
        b, h, t = self.valid.shape
        allowed = self.valid[:, :, None, :].expand(b, h, q, t).clone()
        allowed[..., t - q :] &= _lower_triangle(q, self.device)
        if self.padded:  # padding queries may see nothing; let them see everything (outputs unused)
            allowed |= ~allowed.any(dim=-1, keepdim=True)
        return allowed

    def after_attention(self, query: torch.Tensor) -> None:
        """Keep the recent queries a policy asked for and run the memory step when one is due."""
        if self.owner.probing:
            if self.owner.capture_probe:
                query = query.detach()
                self.probe_queries = query if self.probe_queries is None else torch.cat([self.probe_queries, query], 2)
            return
        policy = self.owner.policy
        window = policy.query_window
        if window is not None:
            query = query.detach()
            self.queries = query if self.queries is None else torch.cat([self.queries, query], dim=2)
            if window != ALL_QUERIES and self.queries.shape[2] > window:
                self.queries = self.queries[:, :, -window:]
        if not self.owner.defer_steps and self.step_due():
            self.memory_step()

    def step_due(self) -> bool:
        """Whether the absolute token count reached or crossed a multiple of ``delay`` since the last step."""
        delay = self.owner.delay
        return self.n_seen // delay > self.last_step // delay

    def drop_probe(self, n_seen: int, capture: bool) -> None:
        """Remove the tokens appended since the layer had seen ``n_seen`` (a probe); keep them as a
        :class:`~namm.policies.base.Probe` for the next memory step when ``capture``."""
        p = self.n_seen - n_seen
        if p <= 0:
            self.probe_queries = None
            return
        if capture and self.probe_queries is not None:
            self.probe = Probe(queries=self.probe_queries, keys=self.keys[:, :, -p:], start=self.last_step,
                               scaling=self.owner.scaling[self.layer_idx], softcap=self.softcap)
        self.probe_queries = None
        self.keys, self.values = self.keys[:, :, :-p], self.values[:, :, :-p]
        if self._positions is not None:
            self._positions = self._positions[..., :-p]
        if self._valid is not None:
            self._valid = self._valid[..., :-p]
        if self._real is not None:
            self._real = self._real[:, :-p]
        self.state = {k: v[:, :, :-p] for k, v in self.state.items()}
        self.n_seen = n_seen
        if self.dense:
            self._forget_dense_metadata()
        self.owner._account(self)

    # --- the memory step ---------------------------------------------------------------------------
    def attention_blocks(self, bounds: list[int]) -> Iterator[torch.Tensor]:
        """Recompute, block by block, the softmax attention of the stored queries against the current slots.

        The stored queries belong to the last ``Q`` slots (appended since the previous memory step), so the
        mask is the slots' validity plus causality over those last ``Q`` slots. Only one block of logits
        exists at a time, so a policy that folds the attention into a running summary (NAMM's spectrogram)
        never materialises the ``(Q, T)`` matrix.

        Args:
            bounds: increasing query indices ``0 = b_0 < b_1 < ... = Q``.

        Yields:
            for each range ``b_i:b_(i+1)`` (``L`` queries), a ``(B, H, L, V)`` float32 tensor: the attention
            those queries gave the first ``V = T - Q + b_(i+1)`` slots, averaged over the query heads of each
            KV head (rows of padding queries are zero). Later slots are in the queries' future: zero.
        """
        b, hq, nq, d = self.queries.shape
        h, t = self.keys.shape[1], self.keys.shape[2]
        g = hq // h
        scale = self.owner.scaling[self.layer_idx]
        queries = self.queries.view(b, h, g, nq, d)
        keys_t = self.keys.float().transpose(-1, -2).contiguous()  # (B, H, D, T): one copy, sliced per block
        hidden = None if self.dense else ~self.valid[:, :, None, None, :]  # (B, H, 1, 1, T)
        causal = _lower_triangle(nq, self.device)
        real = self.real[:, self.n_seen - nq :] if self.padded else None
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            n, vis, cut = hi - lo, t - nq + hi, t - nq + lo
            block = (queries[:, :, :, lo:hi].float() * scale).reshape(b, h, g * n, d)
            logits = torch.matmul(block, keys_t[..., :vis]).view(b, h, g, n, vis)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            if hidden is not None:
                logits.masked_fill_(hidden[..., :vis], float("-inf"))
            logits[..., cut:].masked_fill_(~causal[lo:hi, lo:hi], float("-inf"))
            att = torch.softmax(logits, dim=-1).mean(dim=2)
            if real is not None:
                att *= real[:, None, lo:hi, None]
                att.nan_to_num_(0.0)
            yield att

    def recent_attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole recomputed attention of the stored queries (see :meth:`attention_blocks`).

        Returns:
            ``(B, H, Q, T)`` float32 attention averaged over the query heads of each KV head (rows of
            padding queries zeroed), and the ``(Q,)`` absolute query positions.
        """
        b, hq, nq, _ = self.queries.shape
        h, t = self.keys.shape[1], self.keys.shape[2]
        out = torch.zeros(b, h, nq, t, dtype=torch.float32, device=self.device)
        per_block = max(1, _ATTENTION_CHUNK_ELEMENTS // max(1, b * hq * t))  # bounds the transient logits
        bounds = [*range(0, nq, per_block), nq]
        for lo, att in zip(bounds, self.attention_blocks(bounds), strict=False):
            out[:, :, lo : lo + att.shape[2], : att.shape[3]] = att
        return out, self.query_positions()

    def query_positions(self) -> torch.Tensor:
        """``(Q,)`` int64 absolute positions of the stored queries."""
        return torch.arange(self.n_seen - self.queries.shape[2], self.n_seen, device=self.device)

    def step_view(self, attention=None, query_positions=None, blocks=None) -> MemoryStep:
        """The :class:`MemoryStep` a policy sees for this layer now (without attention unless given)."""
        return MemoryStep(
            layer_idx=self.layer_idx,
            num_layers=len(self.owner.layers),
            keys=self.keys,
            values=self.values,
            positions=self.positions,
            valid=self.valid,
            attention=attention,
            query_positions=query_positions,
            attention_blocks=blocks,
            n_seen=self.n_seen,
            n_real=self.real.sum(dim=-1),
            state=self.state,
            managed_layers=self.owner.managed_ids,
            probe=self.probe,
        )

    def memory_step(self) -> None:
        """Score, select and evict; then forget the stored queries."""
        start = time.perf_counter()
        policy: Policy = self.owner.policy
        attention = qpos = blocks = None
        if policy.query_window is not None and self.queries is not None:
            if policy.streams_attention:
                qpos, blocks = self.query_positions(), self.attention_blocks
            else:
                attention, qpos = self.recent_attention()
        step = self.step_view(attention, qpos, blocks)
        self.probe = None
        scores = policy.score(step)
        keep = policy.keep(step, scores) & self.valid
        self.state = step.state
        before = self.valid.sum(dim=-1)
        if not bool((keep == self.valid).all()) or not bool(self.valid.all()):
            self.compact(keep)
        self.queries = None
        self.last_step = self.n_seen
        if self.dense:
            self._forget_dense_metadata()
        self.owner.stats.steps.append(
            StepRecord(self.layer_idx, self.n_seen, keep.sum(dim=-1).cpu(), before.cpu(), time.perf_counter() - start)
        )
        self.owner.stats.memory_seconds += time.perf_counter() - start

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the ``(B, H, T)`` slots set in ``keep``; shrink storage to the longest head."""
        counts = keep.sum(dim=-1)  # (B, H)
        length = int(counts.max())
        sort_key = torch.where(keep, self.positions, torch.iinfo(torch.long).max)
        idx = sort_key.argsort(dim=-1, stable=True)[..., :length]  # kept slots in position order first

        def gather(t: torch.Tensor) -> torch.Tensor:
            index = idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
            return t.gather(2, index)

        self.keys, self.values = gather(self.keys), gather(self.values)
        self.positions = self.positions.gather(2, idx)
        self.valid = torch.arange(length, device=self.device) < counts[..., None]
        self.state = {k: gather(v) for k, v in self.state.items()}
        self.dense = False
        self.owner._account(self)


class MemoryCache(Cache):
    """A ``Cache`` bound to a policy: pass it as ``past_key_values`` to ``model(...)`` or ``model.generate``.

    Args:
        model: the causal LM (its config decides which layers are managed, and its attention modules
            give the softmax scaling).
        policy: the eviction policy (see :mod:`namm.policies`).
        delay: a memory step runs every ``delay`` tokens, counted by absolute position.
    """

    def __init__(self, model, policy: Policy, delay: int = 512):
        if not isinstance(policy, Policy):
            raise NammError(f"policy must be a namm Policy instance, got {type(policy).__name__}.")
        if not isinstance(delay, int) or delay < 1:
            raise NammError(f"delay must be a positive number of tokens, got {delay!r}.")
        enable(model)
        config = model.config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        self.scaling: dict[int, float] = {}
        for module in attention_modules(model):
            self.scaling[module.layer_idx] = float(getattr(module, "scaling", module.head_dim**-0.5))
        layers = []
        for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(EvictingLayer(idx, self))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
            else:
                raise NammError(
                    f"Layer {idx} of {type(model).__name__} is a {kind!r} layer; namm manages full-attention "
                    "and leaves sliding-window layers to transformers, but cannot handle this layer type."
                )
        if not any(isinstance(layer, EvictingLayer) for layer in layers):
            raise NammError(f"{type(model).__name__} has no full-attention layer for namm to manage.")
        super().__init__(layers=layers)
        self._unmanaged = [lay for lay in layers if not isinstance(lay, EvictingLayer)]
        self.managed_ids = tuple(lay.layer_idx for lay in layers if isinstance(lay, EvictingLayer))
        self.policy = policy
        self.delay = delay
        self.defer_steps = False  # hold memory steps back (shared population prefix, probes); see run_due_steps
        self.probing = False  # tokens now appended are a probe (see probe()): no memory step runs
        self.capture_probe = False  # ... and the layers keep their queries for the next memory step
        self.auto_end_prompt = True  # run end_prompt at the first one-token call; namm.generate calls it itself
        self.stats = CacheStats()
        self._bytes_total = 0
        clear_pending()

    @property
    def managed(self) -> list[EvictingLayer]:
        return [layer for layer in self.layers if isinstance(layer, EvictingLayer)]

    def _account(self, layer: EvictingLayer) -> None:
        """Track the exact storage bytes of the managed layers and their peak (plus the others' now)."""
        new = layer.keys.nbytes + layer.values.nbytes
        self._bytes_total += new - layer.bytes
        layer.bytes = new
        others = sum(lay.keys.nbytes + lay.values.nbytes for lay in self._unmanaged if lay.is_initialized)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self._bytes_total + others)

    def steps_due(self) -> bool:
        """Whether a managed layer is due for a memory step (one is held back by :attr:`defer_steps`)."""
        return any(layer.is_initialized and layer.step_due() for layer in self.managed)

    def unstepped_start(self) -> int:
        """Absolute position of the first token no memory step has seen yet (the same in every managed layer)."""
        return min(layer.last_step for layer in self.managed if layer.is_initialized)

    @contextmanager
    def probe(self, capture: bool = False) -> Iterator[None]:
        """Run tokens through the cache inside this block and take them out again when it ends.

        Inside, forward calls append to every layer as usual (the tokens attend to the whole cache and causally
        to each other; their logits are the model's) but no memory step runs. On exit every layer, sliding ones
        included, is as it was before the block. With ``capture``, each managed layer keeps the probe tokens'
        queries and keys and hands them, as a :class:`~namm.policies.base.Probe`, to its next memory step.
        """
        if self.probing:
            raise NammError("A namm cache probe cannot be nested.")
        marks = [(layer, layer.n_seen) for layer in self.managed if layer.is_initialized]
        if len(marks) != len(self.managed):
            raise NammError("A namm cache can only be probed after the prompt has been processed.")
        saved = [(layer, dict(vars(layer))) for layer in self._unmanaged]  # their update() rebinds, never mutates
        self.probing, self.capture_probe = True, capture
        try:
            yield
        finally:
            self.probing = self.capture_probe = False
            clear_pending()
            for layer, n_seen in marks:
                layer.drop_probe(n_seen, capture)
            for layer, attributes in saved:
                layer.__dict__.clear()
                layer.__dict__.update(attributes)

    def run_due_steps(self) -> None:
        """Run the memory steps that :attr:`defer_steps` held back."""
        for layer in self.managed:
            if layer.is_initialized and layer.step_due():
                layer.memory_step()

    def end_prompt(self) -> None:
        """The prompt is complete: run a memory step in every managed layer that holds more than the policy's
        budget (:meth:`Policy.over_budget`), so the budget holds before the answer is generated even when the
        prompt ends between two steps of the ``delay`` cadence. The step is recorded like any other; the
        cadence stays on absolute multiples of ``delay``. :func:`namm.generate` calls it after the prefill;
        otherwise (``model.generate``) it runs once, at the first one-token (decoding) call."""
        self.auto_end_prompt = False
        for layer in self._over_budget():
            layer.memory_step()

    def _over_budget(self) -> list[EvictingLayer]:
        return [layer for layer in self.managed if layer.is_initialized and layer.n_seen > layer.last_step
                and self.policy.over_budget(layer.step_view())]

    def prompt_over_budget(self) -> bool:
        """Whether :meth:`end_prompt` would run a step (a layer holds more than the policy's budget)."""
        return bool(self._over_budget())

    def compress_now(self) -> None:
        """Run a memory step in every managed layer now, off the ``delay`` cadence (question-agnostic mode)."""
        for layer in self.managed:
            if layer.is_initialized and layer.n_seen > layer.last_step:
                layer.memory_step()

    def kv_bytes(self) -> int:
        """Bytes of key/value storage in every layer now (padding slots included)."""
        return sum(
            lay.keys.nbytes + lay.values.nbytes for lay in self.layers if getattr(lay, "is_initialized", False)
        )

    def kept_tokens(self) -> torch.Tensor:
        """``(L_managed, B, H)`` valid tokens per managed layer, row and KV head."""
        return torch.stack([layer.kept_counts() for layer in self.managed if layer.is_initialized])

    def padding_fraction(self) -> float:
        """Fraction of managed storage slots that are invalid (per-head compaction padding)."""
        slots = sum(layer.valid.numel() for layer in self.managed if layer.is_initialized)
        valid = sum(int(layer.valid.sum()) for layer in self.managed if layer.is_initialized)
        return 1.0 - valid / slots if slots else 0.0
