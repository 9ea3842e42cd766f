"""Attention routing: an SDPA wrapper registered in transformers' attention-function registry.

``enable(model)`` registers the ``"namm"`` attention implementation and switches the model to it.
For every layer that a :class:`namm.cache.MemoryCache` does not manage (no cache, sliding-window
layers, a plain ``DynamicCache``) it is exactly transformers' SDPA.

The routing of a managed layer is one way. transformers calls ``cache.update(keys, values, layer_idx)``
and then the attention function; the cache cannot be reached from the attention function's arguments,
so :meth:`MemoryCache.update <namm.cache.MemoryCache.update>` leaves a :class:`ManagedCall` here
(:func:`hand_over`) and the attention function takes it (:func:`take`). The call carries three callbacks
of the cache, and the attention function

1. reads from transformers' 4-D mask which of this call's tokens are real (left padding is not),
2. asks ``call.slot_mask(q, real)`` for the mask over the layer's slots: ``None`` while nothing has been
   evicted (then transformers' own mask is used, so a cache that never evicts reproduces the model bit
   for bit), else a per-KV-head boolean mask from each slot's validity and absolute position (GQA handled
   by folding the query heads of a group into the query axis, so keys and values are never repeated); for a
   layer that stores each KV head apart (ragged, :mod:`namm.store`), ``call.head_slots(q)`` gives each head's
   keys, values and mask instead, and the attention runs head by head (:func:`ragged_attention`),
3. runs SDPA, and hands the queries back with ``call.attended(query, softcap)``: the cache keeps what the
   policy asked for and runs a memory step when one is due (:mod:`namm.step`).

When the cache sets ``call.wants_weights`` (a memory step follows this very call and will read every query of
it, e.g. a prefill chunk of ``delay`` tokens under NAMM or H2O), step 3 computes the attention explicitly
instead (:func:`explicit_attention`: float32 softmax, ``P @ V``) and hands the KV-head-averaged weights over
too, ``call.attended(query, softcap, weights)``, so that the step does not recompute them.

This module knows nothing of the cache's classes: the import goes one way (cache -> attention).
Attention weights are only ever computed for the queries a policy asks for, at memory steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm.errors import NammError

IMPLEMENTATION = "namm"


@dataclass(frozen=True)
class ManagedCall:
    """What the cache hands to the attention call of one managed layer, right after appending to it.

    Attributes:
        layer_idx: the decoder layer whose attention comes next.
        n_seen: tokens the layer has processed, this call's ``Q`` included (its slots are the last ``Q``).
        slot_mask: ``slot_mask(q, real)``, with this call's ``q`` tokens and ``real`` ``(B, Q)`` bool (which of
            them are real, or ``None`` when all are), returns the ``(B, H, Q, T)`` bool mask of the slots each
            query may attend to, or ``None`` when transformers' own mask applies (nothing evicted, no padding).
        attended: ``attended(query, softcap, weights)`` with the ``(B, H_q, Q, D)`` queries, after the attention;
            ``weights``: ``(B, H, Q, T)`` float32, this call's attention averaged over the query heads of each KV
            head (padding query rows zero), when it was computed explicitly, else ``None``.
        wants_weights: the cache would use this call's weights (a memory step reading all its queries follows
            at once); the attention then computes them with :func:`explicit_attention` where it can.
        head_slots: ``head_slots(q)``, after ``slot_mask``: for a layer that stores each KV head apart, per KV head
            its keys ``(B, 1, T_h, D)``, values ``(B, 1, T_h, D_v)`` and the ``(B, 1, Q, T_h)`` bool mask of its
            slots (``None``: every slot visible), stacked at the front to ``T = max T_h`` in the step's view;
            ``None`` for a layer stored whole (the ``key`` and ``value`` the attention gets then).
    """

    layer_idx: int
    n_seen: int
    slot_mask: Callable[[int, torch.Tensor | None], torch.Tensor | None]
    attended: Callable[[torch.Tensor, float | None, torch.Tensor | None], None]
    wants_weights: bool = False
    head_slots: Callable[[int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None] = lambda q: None


# The handoff between the cache's ``update`` and the attention call that follows it in the same module.
_PENDING = threading.local()


def hand_over(call: ManagedCall) -> None:
    """Called by the cache's ``update``: the attention call of ``call.layer_idx`` comes next."""
    _PENDING.call = call


def check_nothing_pending() -> None:
    """Raise if a call was handed over but no attention took it (the model is not on namm's attention)."""
    stale = getattr(_PENDING, "call", None)
    if stale is not None:
        _PENDING.call = None
        raise NammError(
            f"Layer {stale.layer_idx} of the namm cache was updated but its attention did not run through "
            "namm's attention function. Call namm.enable(model) (load_model does it) before generating."
        )


def take(layer_idx: int) -> ManagedCall | None:
    """Return (and clear) the call the cache handed over for ``layer_idx`` just before, or None."""
    call = getattr(_PENDING, "call", None)
    if call is None or call.layer_idx != layer_idx:
        return None
    _PENDING.call = None
    return call


def clear_pending() -> None:
    """Forget a pending call (e.g. after a forward pass was interrupted by an exception)."""
    _PENDING.call = None


def real_tokens(attention_mask: torch.Tensor | None, n_seen: int, q: int) -> torch.Tensor | None:
    """``(B, Q)`` bool: which of a call's ``q`` tokens (absolute positions ``n_seen - q .. n_seen - 1``) are real.

    ``attention_mask`` is the 4-D mask transformers built over absolute positions, ``(B, 1, Q, n_seen)`` (bool,
    or additive float), or ``None``; its last query row sees every real earlier token. ``None`` when every
    token is real.
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    row = attention_mask[:, 0, -1, n_seen - q : n_seen]
    real = row if row.dtype == torch.bool else row == 0
    return None if bool(real.all()) else real


def namm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the transformers signature: query ``(B, H_q, Q, D)``, key/value ``(B, H, T, D)``.

    Returns the output ``(B, Q, H_q, D)`` and ``None`` (no weights).
    """
    call = take(getattr(module, "layer_idx", -1))
    if call is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q = query.shape[2]
    real = real_tokens(attention_mask, call.n_seen, q)
    allowed = call.slot_mask(q, real)
    heads = call.head_slots(q)
    softcap = kwargs.get("softcap")
    weights = None
    # Explicit only where it computes what SDPA does: no soft-cap (SDPA ignores it), no dropout, no sinks, and a
    # boolean (or no) mask from transformers while the layer is dense.
    plain = softcap is None and not dropout and kwargs.get("s_aux") is None
    explicit = call.wants_weights and plain and (
        allowed is not None or heads is not None or attention_mask is None or attention_mask.dtype == torch.bool)
    if heads is not None:
        out, weights = ragged_attention(query, heads, scaling, real, explicit)
    elif explicit:
        if allowed is None:
            allowed = _dense_mask(attention_mask, q, key.shape[2], key.device)
        out, weights = explicit_attention(query, key, value, allowed, scaling, real)
    elif allowed is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    else:
        out = _per_head_sdpa(query, key, value, allowed, scaling)
    call.attended(query, None if softcap is None else float(softcap), weights)
    return out, None


#: Float32 logits per block of queries in :func:`explicit_attention` (256 MiB, as ``namm.step`` bounds its own).
LOGIT_BLOCK_ELEMENTS = 1 << 26


def _dense_mask(attention_mask: torch.Tensor | None, q: int, t: int, device) -> torch.Tensor:
    """``(B or 1, 1, Q, T)`` bool over a dense layer's slots (slot i holds position i): transformers' own boolean
    mask, or the causal triangle over the last ``q`` slots where it passed none."""
    if attention_mask is not None:
        return attention_mask[:, :, :, :t]
    allowed = torch.ones(1, 1, q, t, dtype=torch.bool, device=device)
    allowed[..., t - q :] = torch.ones(q, q, dtype=torch.bool, device=device).tril_()
    return allowed


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float | None,
    real: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention computed in float32, returning its weights as well as its output.

    The same arithmetic as :func:`namm.step.recompute_attention` (scaled float32 logits, masked, softmaxed),
    block by block of queries (at most :data:`LOGIT_BLOCK_ELEMENTS` logits at once). The G query heads of a KV
    head are folded into its query axis, so keys and values are never repeated.

    Args:
        query: ``(B, H_q, Q, D)``, this call's queries; they belong to the last ``Q`` slots.
        key, value: ``(B, H, T, D)`` / ``(B, H, T, D_v)``, every slot of the layer.
        allowed: ``(B or 1, H or 1, Q, T)`` bool, the slots each query may attend to (causal over the last ``Q``).
        scaling: the softmax scale (``None``: ``D ** -0.5``).
        real: ``(B, Q)`` bool, which queries are real (``None``: all); padding rows of the weights are zero.

    Returns:
        the output ``(B, Q, H_q, D_v)`` in the value dtype, and the weights ``(B, H, Q, T)`` float32 averaged over
        the query heads of each KV head.
    """
    b, hq, q, d = query.shape
    h, t, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // h
    scale = d**-0.5 if scaling is None else scaling
    queries = query.reshape(b, h, g, q, d)  # query heads h*G..h*G+G-1 read KV head h (repeat_kv order)
    keys_t, values = key.float().transpose(-1, -2), value.float()  # (B, H, D, T), (B, H, T, D_v)
    hidden = ~allowed[:, :, None]  # (B|1, H|1, 1, Q, T)
    out = value.new_empty(b, h, g, q, dv)
    weights = torch.zeros(b, h, q, t, dtype=torch.float32, device=query.device)
    per_block = max(1, LOGIT_BLOCK_ELEMENTS // max(1, b * hq * t))
    for lo in range(0, q, per_block):
        hi = min(q, lo + per_block)
        n, vis = hi - lo, t - q + hi  # later slots are every block query's future
        block = (queries[:, :, :, lo:hi].float() * scale).reshape(b, h, g * n, d)
        logits = torch.matmul(block, keys_t[..., :vis]).view(b, h, g, n, vis)
        logits.masked_fill_(hidden[..., lo:hi, :vis], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[:, :, :, lo:hi] = torch.matmul(probs.view(b, h, g * n, vis), values[:, :, :vis]).view(b, h, g, n, dv)
        weights[:, :, lo:hi, :vis] = probs.mean(dim=2)
    if real is not None:
        weights *= real[:, None, :, None]
        weights.nan_to_num_(0.0)
    return out.view(b, hq, q, dv).transpose(1, 2).contiguous(), weights


def ragged_attention(
    query: torch.Tensor,
    heads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    scaling: float | None,
    real: torch.Tensor | None,
    with_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over a layer whose KV heads are stored apart, one call per KV head.

    Args:
        query: ``(B, H_q, Q, D)``; query heads ``h*G .. h*G+G-1`` read KV head ``h`` (repeat_kv order).
        heads: per KV head, keys ``(B, 1, T_h, D)``, values ``(B, 1, T_h, D_v)`` and the ``(B, 1, Q, T_h)`` bool mask
            of visible slots (``None``: all), as :meth:`namm.store.EvictingLayer.head_slots` gives them.
        scaling: the softmax scale (``None``: ``D ** -0.5``).
        real: ``(B, Q)`` bool, which queries are real (``None``: all).
        with_weights: compute the attention explicitly (:func:`explicit_attention`) and return its weights.

    Returns:
        the output ``(B, Q, H_q, D_v)`` and, with ``with_weights``, the ``(B, H, Q, T)`` float32 weights averaged over
        each KV head's query heads, each head's ``T_h`` slots the last of ``T = max T_h`` (as the memory step stacks
        them), else ``None``.
    """
    b, hq, q, _ = query.shape
    g = hq // len(heads)
    outs, weights = [], None
    if with_weights:
        t = max(k.shape[2] for k, _, _ in heads)
        weights = torch.zeros(b, len(heads), q, t, dtype=torch.float32, device=query.device)
    for h, (keys, values, allowed) in enumerate(heads):
        group = query[:, h * g : (h + 1) * g]  # (B, G, Q, D)
        if with_weights:
            if allowed is None:
                allowed = torch.ones(1, 1, q, keys.shape[2], dtype=torch.bool, device=keys.device)
            out, w = explicit_attention(group, keys, values, allowed, scaling, real)  # (B, Q, G, D_v)
            weights[:, h : h + 1, :, t - keys.shape[2] :] = w
            outs.append(out)
        else:  # the G query heads read the head's keys and values through a stride-0 view; the mask broadcasts
            n = keys.shape[2]
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                group, keys.expand(b, g, n, keys.shape[-1]), values.expand(b, g, n, values.shape[-1]),
                attn_mask=allowed, scale=scaling))  # (B, G, Q, D_v)
    if with_weights:
        return torch.cat(outs, dim=2), weights
    return torch.cat(outs, dim=1).transpose(1, 2).contiguous(), None


def _per_head_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """SDPA with a per-KV-head mask ``allowed`` ``(B, H, Q, T)``; the G query heads of a group share it.

    Each KV head becomes a batch row whose G query heads read it through an expanded (stride-0) view, so the mask
    is passed as a ``(B*H, 1, Q, T)`` view that broadcasts over the G heads: nothing of size ``G*Q*T`` is built
    (folding the G heads into the query axis needed a copy of the mask, and SDPA's conversion of that copy to an
    additive mask cost about a quarter of the call; docs/benchmarks.md).
    """
    b, hq, q, d = query.shape
    h, t = key.shape[1], key.shape[2]
    g = hq // h
    per_kv = query.reshape(b * h, g, q, d)  # query heads h*G..h*G+G-1 read KV head h (repeat_kv order)
    keys = key.reshape(b * h, 1, t, d).expand(b * h, g, t, d)
    values = value.reshape(b * h, 1, t, value.shape[-1]).expand(b * h, g, t, value.shape[-1])
    mask = allowed.reshape(b * h, 1, q, t)
    out = torch.nn.functional.scaled_dot_product_attention(per_kv, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, q, value.shape[-1]).transpose(1, 2).contiguous()


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's self-attention modules (those carrying a ``layer_idx``)."""
    return [
        m for m in model.modules() if "Attention" in type(m).__name__ and isinstance(getattr(m, "layer_idx", None), int)
    ]


def _register() -> None:
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, namm_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Route ``model``'s attention through namm (identical to SDPA for anything namm does not manage).

    Raises:
        NammError: if the model's attention cannot be managed (encoder-decoder, no attention-function
            registry support, or no self-attention modules with a ``layer_idx``).
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise NammError(f"{name} is not a decoder-only transformers model; namm manages decoder KV caches only.")
    if getattr(config, "_attn_implementation", None) == IMPLEMENTATION:
        return model
    supported = getattr(model, "_supports_attention_backend", False) or model._can_set_attn_implementation()
    if not supported or not attention_modules(model):
        raise NammError(
            f"The attention of {name} cannot be managed: namm needs a model whose attention goes through "
            "transformers' attention-function registry (most decoder models: Llama, Qwen2, Mistral, Gemma 3, ...)."
        )
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    if config._attn_implementation != IMPLEMENTATION:
        raise NammError(f"Could not switch {name} to namm's attention function.")
    return model
