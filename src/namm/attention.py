"""Attention routing: an SDPA wrapper registered in transformers' attention-function registry.

``enable(model)`` registers the ``"namm"`` attention implementation and switches the model to it.
For every layer that a :class:`namm.cache.MemoryCache` does not manage (no cache, sliding-window
layers, a plain ``DynamicCache``) it is exactly transformers' SDPA. For a managed layer it

1. marks left-padding tokens of this call as invalid slots,
2. runs SDPA over the layer's slots: while nothing has been evicted, with transformers' own mask
   (so a cache that never evicts reproduces the model bit for bit); afterwards with a per-KV-head
   boolean mask built from each slot's validity and absolute position (GQA handled by folding the
   query heads of a group into the query axis, so keys and values are never repeated),
3. hands the queries to the layer, which runs the policy's memory step when one is due.

Attention weights are only ever computed for the queries a policy asks for, at memory steps.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm.errors import NammError

IMPLEMENTATION = "namm"

# The handoff between a managed layer's ``update`` (namm.cache) and the attention call that follows it in
# the same module: the layer hands itself over, the attention function takes it. This module owns it and
# knows nothing of the cache's classes, so the import goes one way (cache -> attention).
_PENDING = threading.local()


def hand_over(layer) -> None:
    """Called by a managed layer's ``update``: its attention call comes next (``layer.layer_idx`` names it)."""
    _PENDING.layer = layer


def check_nothing_pending() -> None:
    """Raise if a layer was handed over but its attention never took it (the model is not on namm's attention)."""
    stale = getattr(_PENDING, "layer", None)
    if stale is not None:
        _PENDING.layer = None
        raise NammError(
            f"Layer {stale.layer_idx} of the namm cache was updated but its attention did not run through "
            "namm's attention function. Call namm.enable(model) (load_model does it) before generating."
        )


def take_pending(layer_idx: int):
    """Return (and clear) the managed layer whose ``update`` ran just before this attention call, or None."""
    layer = getattr(_PENDING, "layer", None)
    if layer is None or layer.layer_idx != layer_idx:
        return None
    _PENDING.layer = None
    return layer


def clear_pending() -> None:
    """Forget a pending layer (e.g. after a forward pass was interrupted by an exception)."""
    _PENDING.layer = None


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
    layer = take_pending(getattr(module, "layer_idx", -1))
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        layer.softcap = float(kwargs["softcap"])
    q = query.shape[2]
    layer.observe_padding(attention_mask, q)
    if layer.dense:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    else:
        out = _per_head_sdpa(query, key, value, layer.slot_mask(q), scaling)
    layer.after_attention(query)
    return out, None


def _per_head_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """SDPA with a per-KV-head mask ``allowed`` ``(B, H, Q, T)``; the G query heads of a group share it."""
    b, hq, q, d = query.shape
    h, t = key.shape[1], key.shape[2]
    g = hq // h
    folded = query.reshape(b, h, g * q, d)  # query heads h*G..h*G+G-1 read KV head h (repeat_kv order)
    mask = allowed[:, :, None].expand(b, h, g, q, t).reshape(b, h, g * q, t)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
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
