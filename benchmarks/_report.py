"""Shared by the benchmark scripts: the filler prompt, the two timed runs every cost table is made of (plain
transformers and namm's engine), and writing a marked section of docs/benchmarks.md."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import DynamicCache

import namm
from namm.bench.leaderboard import write_section as _write_section
from namm.cache import cache_argument

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "Some people like to travel by train because it is relaxing and they can read a book. "
)


def make_ids(tok, length: int) -> torch.Tensor:
    """``(1, length)`` token ids of filler text."""
    ids = tok(FILLER * (length // 20 + 10), return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def write_section(path: Path, name: str, lines: list[str]) -> str:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    _write_section(path, name, lines, title="# Benchmarks")
    return "\n".join([f"<!-- {name}:start -->", *lines, f"<!-- {name}:end -->"])


@torch.inference_mode()
def plain_transformers(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """The reference: one-pass SDPA prefill of ``ids`` ``(1, T)`` into a ``DynamicCache``, then greedy decoding.

    Returns seconds (``prefill``, ``decode`` per token, ``total``), ``memory`` 0.0 s over ``steps`` 0, ``cache`` 1.0
    and ``peak_kv`` / ``final_kv`` bytes, the keys of :func:`engine`'s result.
    """
    model.set_attn_implementation("sdpa")
    try:
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        logits = model(ids, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, **{cache_argument(model): cache}, use_cache=True).logits[:, -1]
        decode = time.perf_counter() - t1
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    finally:
        model.set_attn_implementation("namm")
    return {"prefill": prefill, "decode": decode / max(new_tokens - 1, 1), "total": prefill + decode,
            "memory": 0.0, "steps": 0, "cache": 1.0, "peak_kv": kv, "final_kv": kv}


def engine(model, tok, ids: torch.Tensor, policy, new_tokens: int, chunk: int | None = None,
           delay: int = 512) -> dict:
    """namm's engine (``namm.generate``) on ``ids`` ``(1, T)`` with ``policy``, a memory step every ``delay`` tokens,
    prefill chunks of ``chunk`` (``None``: the engine's default), ``new_tokens`` greedy tokens (EOS ignored).

    Returns seconds (``prefill``, ``decode`` per token, ``total``, ``memory``: all memory steps), ``steps`` (memory
    steps, counted once over the layers), ``cache`` (mean cache fraction) and ``peak_kv`` / ``final_kv`` bytes.
    """
    out = namm.generate(model, tok, ids[0], policy, max_new_tokens=new_tokens, delay=delay, chunk_size=chunk,
                        ignore_eos=True)
    s = out.stats
    return {"prefill": s.prefill_seconds, "decode": s.decode_seconds / max(s.generated_tokens[0] - 1, 1),
            "total": s.prefill_seconds + s.decode_seconds, "memory": s.memory_seconds,
            "steps": len({step["n_seen"] for step in s.steps}), "cache": s.cache_fraction,
            "peak_kv": s.peak_kv_bytes, "final_kv": s.kv_bytes}
