"""A transformers ``Cache`` that runs a policy's memory steps over per-head evicting storage.

Data flows one way: engine -> cache -> policy -> eviction.

* :class:`MemoryCache` is the orchestrator. transformers calls its :meth:`~MemoryCache.update` for every
  layer; for a managed (full-attention) layer it appends to the layer's store and hands the attention call
  that follows a :class:`~namm.attention.ManagedCall` (three callbacks of the cache). After the attention the
  cache keeps the queries the policy's :class:`~namm.policies.base.StepRequest` asks for and, when the
  layer's absolute token count reaches or crosses a multiple of ``delay``, runs a memory step
  (:func:`namm.step.run_step`: build the :class:`~namm.policies.base.MemoryStep`, call the policy, compact).
  It records every step (:class:`~namm.step.StepRecord`) and the bytes stored.
* :class:`~namm.store.EvictingLayer` (one per managed layer) is a plain per-head store: append, slot mask,
  compact, index the batch, probe bookkeeping. It holds no reference to the cache.

Sliding-window layers (e.g. 15 of Gemma 3's 18 layers) are left to transformers' own
``DynamicSlidingWindowLayer``, which already bounds them; only global layers are managed.

Probes (:meth:`MemoryCache.probe`): tokens run through the cache and taken out again afterwards, so that the
cache is as before; no memory step runs meanwhile. The engine uses them to teacher-force a gold answer
(:mod:`namm.scoring`) and, for a policy that requests a probe (KVzip), to run its reconstruction prompt before
a memory step: each layer then keeps the probe's queries and keys and the step gets them as a
:class:`~namm.policies.base.Probe`.

Hooks for whoever drives the forward calls: :meth:`MemoryCache.hold_steps` holds the memory steps that fall
due back until :meth:`MemoryCache.run_due_steps` (the engine's probe steps; a shared prefix fanned out to
several batch rows in :mod:`namm.evolution.population`), and the batch methods transformers defines
(``batch_repeat_interleave``, ``batch_select_indices``, ``reorder_cache``) index every layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from namm.attention import ManagedCall, attention_modules, check_nothing_pending, clear_pending, enable, hand_over
from namm.errors import NammError
from namm.policies.base import ALL_QUERIES, Policy, Probe
from namm.step import ATTENTION_CHUNK_ELEMENTS, CacheStats, LayerContext, StepRecord, run_step, step_view
from namm.store import EvictingLayer


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward takes the cache: ``cache`` (newer transformers 5 releases,
    where ``past_key_values`` is deprecated) or ``past_key_values``."""
    import inspect  # noqa: PLC0415

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class MemoryCache(Cache):
    """A ``Cache`` bound to a policy: pass it as ``cache`` (``past_key_values``) to ``model(...)`` or
    ``model.generate``.

    Args:
        model: the causal LM (its config decides which layers are managed, and its attention modules
            give the softmax scaling).
        policy: the eviction policy (see :mod:`namm.policies`).
        delay: a memory step runs every ``delay`` tokens, counted by absolute position.
    """

    #: True: a memory step that follows a chunk at once and reads all its queries takes the weights the chunk's
    #: attention call computed explicitly (:meth:`_wants_weights`) instead of SDPA + a recompute. Off by default:
    #: measured on SmolLM2 at 4k, 2 threads (benchmarks/attention_reuse_ab.py, docs/benchmarks.md), it made a
    #: keep-all NAMM's prefill slower (23.8 s vs 19.3 s) and H2O's slightly faster (11.1 s vs 12.1 s).
    reuse_attention: bool = False

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
        self.softcap: dict[int, float] = {}  # per managed layer, as its attention calls report it
        layers = []
        for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(EvictingLayer(idx))
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
        self.probing = False  # tokens now appended are a probe (see probe()): no memory step runs
        self.capture_probe = False  # ... and the layers keep their queries for the next memory step
        self._probe_steps: str | None = None  # ... and each layer steps as soon as its probe has run (see probe())
        self._probe_marks: dict[int, int] = {}  # n_seen of each managed layer when the probe began
        self.auto_end_prompt = True  # run end_prompt at the first one-token call; namm.generate calls it itself
        self.stats = CacheStats()
        self._held = False  # memory steps that fall due wait for run_due_steps (hold_steps)
        self._probes: dict[int, Probe] = {}  # the last captured probe per layer, for its next memory step
        self._layer_bytes: dict[int, int] = {}
        self._bytes_total = 0
        self._callbacks = {
            lay.layer_idx: (self._slot_mask_for(lay), self._attended_by(lay), self._head_slots_for(lay))
            for lay in self.managed
        }
        clear_pending()

    # --- the forward pass: transformers calls update, then the attention function ------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' entry point: append this call's ``(B, H, Q, D)`` keys and values to layer ``layer_idx``.

        For a managed layer, also hand the attention call that follows a :class:`~namm.attention.ManagedCall`
        (see :mod:`namm.attention`); when the call is at its end the cache keeps the queries and runs a due step.
        """
        layer = self.layers[layer_idx]
        if not isinstance(layer, EvictingLayer):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        check_nothing_pending()
        if key_states.shape[2] == 1 and self.auto_end_prompt:  # decoding starts (e.g. inside model.generate)
            self.end_prompt()
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._account(layer)
        slot_mask, attended, head_slots = self._callbacks[layer_idx]
        wants_weights = self._wants_weights(layer, key_states.shape[2])
        hand_over(ManagedCall(layer_idx, layer.n_seen, slot_mask, attended, wants_weights, head_slots))
        return keys, values

    def _wants_weights(self, layer: EvictingLayer, q: int) -> bool:
        """Whether the attention call that follows (``q`` queries, just appended) should compute its weights for
        the memory step right after it.

        True when the policy reads every query's attention, a step runs at the end of this call, and its queries
        will be exactly this call's (nothing kept since the previous step: a prefill chunk of ``delay`` tokens),
        and the ``(B, H, Q, T)`` float32 weights stay within the step's own bound on an attention block. Else the
        step recomputes the attention from the kept queries, as for decoding steps and smaller chunks.
        """
        if (not self.reuse_attention or self.policy.request.queries != ALL_QUERIES or self.probing or self._held
                or layer.queries is not None):
            return False
        b, h, t = layer.slot_shape()
        return self._due(layer) and b * h * q * t <= ATTENTION_CHUNK_ELEMENTS

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append precomputed ``(B, H, Q, D)`` keys and values to managed layer ``layer_idx`` with no attention call
        (a replay of a recorded run, :mod:`namm.evolution.replay`); memory steps that fall due wait for
        :meth:`run_due_steps`."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, EvictingLayer):
            raise NammError(f"Layer {layer_idx} is not managed by namm; only managed layers take appended keys.")
        layer.update(keys, values)
        self._account(layer)

    def _slot_mask_for(self, layer: EvictingLayer):
        def slot_mask(q: int, real: torch.Tensor | None) -> torch.Tensor | None:
            if real is not None:
                layer.mark_padding(real)
            return None if layer.dense or layer.ragged else layer.slot_mask(q)

        return slot_mask

    @staticmethod
    def _head_slots_for(layer: EvictingLayer):
        def head_slots(q: int):
            return layer.head_slots(q) if layer.ragged else None

        return head_slots

    def _attended_by(self, layer: EvictingLayer):
        # a weak reference: the cache holds this callback, so a strong one would make a reference cycle, and every
        # cache (gigabytes of keys and values in a population) would wait for the cyclic garbage collector
        cache = weakref.proxy(self)

        def attended(query: torch.Tensor, softcap: float | None, weights: torch.Tensor | None = None) -> None:
            if softcap is not None:
                cache.softcap[layer.layer_idx] = softcap
            if cache.probing:
                if cache.capture_probe:
                    layer.keep_probe_queries(query)
                    if cache._probe_steps is not None:
                        cache._step_after_probe(layer)
                return
            queries = cache.policy.request.queries
            if queries is not None:
                layer.keep_queries(query, None if queries == ALL_QUERIES else queries)
            if not cache._held and cache._due(layer):
                if weights is not None and (layer.queries is None or weights.shape[2] != layer.queries.shape[2]):
                    weights = None  # not the step's queries: it recomputes
                cache._step(layer, weights)

        return attended

    # --- memory steps -----------------------------------------------------------------------------
    def _due(self, layer: EvictingLayer) -> bool:
        """Whether the absolute token count reached or crossed a multiple of ``delay`` since the last step."""
        return layer.n_seen // self.delay > layer.last_step // self.delay

    def _context(self, layer: EvictingLayer) -> LayerContext:
        idx = layer.layer_idx
        return LayerContext(len(self.layers), self.managed_ids, self.scaling[idx], self.softcap.get(idx))

    def _step(self, layer: EvictingLayer, weights: torch.Tensor | None = None) -> None:
        """Run the policy's memory step in ``layer`` now and record it (``weights``: see :func:`run_step`)."""
        probe = self._probes.pop(layer.layer_idx, None)
        self._account(layer, during_step=True)  # a ragged layer's step works on a stacked copy of it
        record: StepRecord = run_step(layer, self.policy, self._context(layer), probe, weights)
        self.stats.steps.append(record)
        self.stats.memory_seconds += record.seconds
        self._account(layer)

    def hold_steps(self, hold: bool = True) -> None:
        """Hold back (``hold=False``: stop holding) the memory steps that fall due during forward calls; the
        held steps run at :meth:`run_due_steps`."""
        self._held = hold

    def steps_due(self) -> bool:
        """Whether a managed layer is due for a memory step (one held back by :meth:`hold_steps`)."""
        return any(layer.is_initialized and self._due(layer) for layer in self.managed)

    def run_due_steps(self) -> None:
        """Run the memory steps that are due (those :meth:`hold_steps` held back)."""
        for layer in self.managed:
            if layer.is_initialized and self._due(layer):
                self._step(layer)

    def unstepped_start(self) -> int:
        """Absolute position of the first token no memory step has seen yet (the same in every managed layer)."""
        return min(layer.last_step for layer in self.managed if layer.is_initialized)

    @property
    def managed(self) -> list[EvictingLayer]:
        return [layer for layer in self.layers if isinstance(layer, EvictingLayer)]

    @property
    def batch_rows(self) -> int:
        """Batch rows the cache holds (0 before the first token)."""
        first = self.layers[self.managed_ids[0]]
        return first.slot_shape()[0] if first.is_initialized else 0

    def _account(self, layer: EvictingLayer, during_step: bool = False) -> None:
        """Track the exact storage bytes of the managed layers and their peak (plus the others' now).

        ``during_step``: a memory step of ``layer`` starts; a ragged layer's stacked copy counts towards the peak.
        """
        new = layer.nbytes
        self._bytes_total += new - self._layer_bytes.get(layer.layer_idx, 0)
        self._layer_bytes[layer.layer_idx] = new
        transient = layer.step_nbytes() if during_step and layer.ragged else 0
        others = sum(lay.keys.nbytes + lay.values.nbytes for lay in self._unmanaged if lay.is_initialized)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self._bytes_total + others + transient)

    # --- batch rows (transformers' Cache API) ------------------------------------------------------
    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (row ``b`` becomes rows ``b*repeats ...``)."""
        super().batch_repeat_interleave(repeats)
        for layer in self.managed:
            self._account(layer)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for layer in self.managed:
            self._account(layer)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for layer in self.managed:
            self._account(layer)

    # --- probes ---------------------------------------------------------------------------------------
    @contextmanager
    def probe(self, capture: bool = False, steps: str | None = None) -> Iterator[None]:
        """Run tokens through the cache inside this block and take them out again when it ends.

        Inside, forward calls append to every layer as usual (the tokens attend to the whole cache and causally
        to each other; their logits are the model's) but no memory step runs. On exit every layer, sliding ones
        included, is as it was before the block. With ``capture``, each managed layer keeps the probe tokens'
        queries and keys and hands them, as a :class:`~namm.policies.base.Probe`, to its next memory step.

        ``steps`` (with ``capture``, for a probe of one forward call): ``"due"`` runs each layer's due memory step,
        ``"all"`` a step in every layer (:meth:`compress_now`), as soon as that layer's attention of the probe has
        run, with the probe taken out of it first. A layer's step reads only its own cache and probe, so this is
        the step that would run after the block, but no more than one layer holds the probe's tokens at a time
        and the layers before it are already compacted: the peak storage is lower. Its time counts as memory
        time, as any step's.
        """
        if self.probing:
            raise NammError("A namm cache probe cannot be nested.")
        if steps not in (None, "due", "all") or (steps is not None and not capture):
            raise NammError(f"probe(steps=...) takes None, 'due' or 'all', with capture=True (got {steps!r}).")
        marks = [(layer, layer.n_seen) for layer in self.managed if layer.is_initialized]
        if len(marks) != len(self.managed):
            raise NammError("A namm cache can only be probed after the prompt has been processed.")
        saved = [(layer, dict(vars(layer))) for layer in self._unmanaged]  # their update() rebinds, never mutates
        self.probing, self.capture_probe, self._probe_steps = True, capture, steps
        self._probe_marks = {layer.layer_idx: n_seen for layer, n_seen in marks}
        try:
            yield
        finally:
            self.probing = self.capture_probe = False
            self._probe_steps = None
            clear_pending()
            for layer, n_seen in marks:
                self._take_probe_out(layer, n_seen, capture)
            for layer, attributes in saved:
                layer.__dict__.clear()
                layer.__dict__.update(attributes)

    def _take_probe_out(self, layer: EvictingLayer, n_seen: int, capture: bool) -> None:
        """Remove the probe's tokens from ``layer`` (it had seen ``n_seen`` before them); with ``capture``, keep its
        queries and keys for the layer's next step. Nothing to do where they are out already."""
        queries, keys = layer.drop_probe(n_seen)
        if capture and queries is not None and keys is not None:
            idx = layer.layer_idx
            self._probes[idx] = Probe(queries=queries, keys=keys, start=layer.last_step,
                                      scaling=self.scaling[idx], softcap=self.softcap.get(idx))
        self._account(layer)

    def _step_after_probe(self, layer: EvictingLayer) -> None:
        """``layer``'s attention of the probe has run: take the probe out and run its step now (``probe(steps=)``)."""
        self._take_probe_out(layer, self._probe_marks[layer.layer_idx], capture=True)
        if self._due(layer) if self._probe_steps == "due" else layer.n_seen > layer.last_step:
            self._step(layer)

    # --- steps off the cadence --------------------------------------------------------------------
    def end_prompt(self) -> None:
        """The prompt is complete: run a memory step in every managed layer that holds more than the policy's
        budget (:meth:`Policy.over_budget`), so the budget holds before the answer is generated even when the
        prompt ends between two steps of the ``delay`` cadence. The step is recorded like any other; the
        cadence stays on absolute multiples of ``delay``. :func:`namm.generate` calls it after the prefill;
        otherwise (``model.generate``) it runs once, at the first one-token (decoding) call."""
        self.auto_end_prompt = False
        for layer in self._over_budget():
            self._step(layer)

    def _over_budget(self) -> list[EvictingLayer]:
        return [layer for layer in self.managed if layer.is_initialized and layer.n_seen > layer.last_step
                and self.policy.over_budget(step_view(layer, self._context(layer), self._probes.get(layer.layer_idx)))]

    def prompt_over_budget(self) -> bool:
        """Whether :meth:`end_prompt` would run a step (a layer holds more than the policy's budget)."""
        return bool(self._over_budget())

    def compress_now(self) -> None:
        """Run a memory step in every managed layer now, off the ``delay`` cadence (question-agnostic mode)."""
        for layer in self.managed:
            if layer.is_initialized and layer.n_seen > layer.last_step:
                self._step(layer)

    # --- what is stored -----------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of key/value storage in every layer now (padding slots included)."""
        return sum(
            (lay.nbytes if isinstance(lay, EvictingLayer) else lay.keys.nbytes + lay.values.nbytes)
            for lay in self.layers if getattr(lay, "is_initialized", False)
        )

    def kept_tokens(self) -> torch.Tensor:
        """``(L_managed, B, H)`` valid tokens per managed layer, row and KV head."""
        return torch.stack([layer.kept_counts() for layer in self.managed if layer.is_initialized])

    def padding_fraction(self) -> float:
        """Fraction of managed storage slots that are invalid (per-head compaction padding)."""
        counts = [layer.storage_slots() for layer in self.managed if layer.is_initialized]
        slots, valid = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return 1.0 - valid / slots if slots else 0.0


__all__ = ["CacheStats", "EvictingLayer", "MemoryCache", "StepRecord", "cache_argument"]
