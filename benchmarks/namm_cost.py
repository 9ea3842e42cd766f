"""The cost targets of issue 13 in one run: every row of its table, medians of interleaved repeats.

Rows (SmolLM2, fp32, the threads given; every ratio is taken between runs of the same repeat):

* keep-all NAMM (memory step every 512 tokens, 512-token prefill chunks) prefill vs ``Full`` (the engine's
  default: one-pass prefill), at 2k and 4k; target <= 1.3x at 4k. The worst case: zero scores, but a zero-effect
  ``qkv`` weight on a spectrogram bin makes it read the attention features, so every step computes the
  attention weights and the spectrogram (a NAMM with zero parameters reads no feature and skips both: it is a
  context row). For context too, a NAMM that also keeps everything but whose BAM attention is live (random
  weights, head bias +100; a zero output projection skips the BAM attention exactly, see
  ``namm.memory.bam``), and ``Full`` in 512-token chunks.
* ``NAMM(budget=0.5)`` (keeps half; the same attention-reading weights) at 4k: prefill + 64 decoded tokens vs
  Full's, target <= 1.0x; decoding per token vs Full's, target <= 0.7x. For context, the shipped memory
  (``NAMM.from_pretrained("smollm2-135m")``: half the cache, KVzip's reconstruction probe, its own cadence of 128).
* For context, the decoding floor of the model: ``StreamingLLM`` keeping 64 tokens at 4k.
* H2O (25% budget) memory step (mean per step) / prefill at 1k, target <= 5%.
* ``Full`` vs plain transformers (SDPA, ``DynamicCache``) in prefill and decoding at 1k and 4k, target <= 1.03x.
* Decoding cost growth: after a 1k prompt, the slope of the per-token decoding time over ``--growth-tokens``
  tokens (least squares, ms per token per 100 tokens generated) of the namm cache (Full, and NAMM(budget=0.5)
  whose cache is compacted) vs ``DynamicCache``'s; target: no steeper.

    python benchmarks/namm_cost.py --repeats 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from _report import engine, make_ids, plain_transformers, write_section
from transformers import DynamicCache

import namm
from namm.cache import cache_argument
from namm.memory import NAMM, param_count, unflatten
from namm.policies import H2O, Full, StreamingLLM

NEW_TOKENS = 64


def reading_keep_all(budget: float | None = None) -> NAMM:
    """Zero scores (keeps every token; with ``budget``, the budgeted top-k of equal scores), but a non-zero ``qkv``
    weight on the first spectrogram bin, with the output projection at zero: the scores are unchanged, and the
    NAMM reads its attention features, so its memory steps compute them (the worst case of the machinery)."""
    params = torch.zeros(param_count())
    unflatten(params)["qkv_weight"][8, 0] = 1.0
    return NAMM(params=params, budget=budget)


def live_bam_keep_all() -> NAMM:
    """A NAMM that keeps every token but computes its BAM attention: random weights (sigma 0.065, as a CMA-ES
    member), head bias +100 so every score is positive."""
    params = torch.randn(param_count(), generator=torch.Generator().manual_seed(0)) * 0.065
    unflatten(params)["head_bias"].fill_(100.0)
    return NAMM(params=params)


@torch.inference_mode()
def growth(model, ids: torch.Tensor, policy, new_tokens: int) -> dict:
    """Per-token decoding times after the prompt; ``slope`` in ms per token per 100 generated tokens."""
    if policy is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        cache = namm.MemoryCache(model, policy, delay=512)
    try:
        for start in range(0, ids.shape[1], 512):
            logits = model(ids[:, start : start + 512], **{cache_argument(model): cache}, use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        if policy is not None:
            cache.end_prompt()
        times = []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, **{cache_argument(model): cache}, use_cache=True).logits[:, -1]
            times.append(time.perf_counter() - t0)
    finally:
        model.set_attn_implementation("namm")
    x = torch.arange(len(times), dtype=torch.float64)
    y = torch.tensor(times, dtype=torch.float64) * 1e3
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()) * 100
    return {"slope": slope, "mean": float(y.mean())}


def plan(args) -> list[tuple[str, int, str, object]]:
    """``(kind, length, row name, thunk-args)`` in the order run within each repeat."""
    h2o, budget = H2O(budget=0.25), reading_keep_all(budget=0.5)
    shipped = NAMM.from_pretrained("smollm2-135m")
    rows = [
        ("run", 1024, "transformers SDPA", ("plain", NEW_TOKENS)),
        ("run", 1024, "Full", ("engine", Full(), NEW_TOKENS, None)),
        ("run", 1024, "H2O 25%", ("engine", h2o, 1, None)),
        ("run", 2048, "Full", ("engine", Full(), 1, None)),
        ("run", 2048, "NAMM keep-all", ("engine", reading_keep_all(), 1, None)),
        ("run", 4096, "transformers SDPA", ("plain", NEW_TOKENS)),
        ("run", 4096, "Full", ("engine", Full(), NEW_TOKENS, None)),
        ("run", 4096, "Full, 512-token chunks", ("engine", Full(), 1, 512)),
        ("run", 4096, "NAMM keep-all", ("engine", reading_keep_all(), 1, None)),
        ("run", 4096, "NAMM keep-all, zero params (reads no attention)", ("engine", NAMM(), 1, None)),
        ("run", 4096, "NAMM keep-all, live BAM", ("engine", live_bam_keep_all(), 1, None)),
        ("run", 4096, "NAMM(budget=0.5)", ("engine", budget, NEW_TOKENS, None)),
        ("run", 4096, "shipped memory (50%, probe, step every 128)", ("engine", shipped, NEW_TOKENS, None, 128)),
        ("run", 4096, "StreamingLLM(budget=64 tokens)", ("engine", StreamingLLM(budget=64), NEW_TOKENS, None)),
    ]
    if args.growth_tokens:
        rows += [("growth", 1024, "DynamicCache", None), ("growth", 1024, "Full", Full()),
                 ("growth", 1024, "NAMM(budget=0.5)", reading_keep_all(budget=0.5))]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--growth-tokens", type=int, default=192, help="0 skips the decoding-growth rows.")
    ap.add_argument("--scale", type=float, default=1.0, help="Multiply every length (a quick check: 0.25).")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = namm.load_model(args.model)
    rows = plan(args)
    lengths = {n: max(256, int(n * args.scale) // 512 * 512 or 256) for n in {r[1] for r in rows}}
    ids = {n: make_ids(tok, m) for n, m in lengths.items()}
    plain_transformers(model, ids[1024][:, :256], 4)  # warm-up
    engine(model, tok, ids[1024][:, :600], NAMM(), 2)
    results: dict[tuple[str, int, str], list[dict]] = {}
    for rep in range(args.repeats):
        for kind, n, name, spec in rows:
            if kind == "growth":
                r = growth(model, ids[n], spec, args.growth_tokens)
            elif spec[0] == "plain":
                r = plain_transformers(model, ids[n], spec[1])
            else:
                r = engine(model, tok, ids[n], *spec[1:])  # policy, new tokens, chunk[, delay]
            results.setdefault((kind, n, name), []).append(r)
            print(f"rep {rep} [{lengths[n]}] {kind} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()),
                  flush=True)
        # Written after every repeat, so that a run cut short still leaves the medians of its whole repeats.
        med = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for key, rs in results.items()}
        write(args, med, lengths, rep + 1)


def write(args, med: dict, lengths: dict[int, int], repeats: int) -> None:
    def run(n: int, name: str) -> dict:
        return med[("run", n, name)]

    def label(n: int) -> str:
        return f"{lengths[n] // 1024}k" if lengths[n] % 1024 == 0 else str(lengths[n])

    targets = []  # (target, measured, ratio, bound)
    full4, keep4 = run(4096, "Full"), run(4096, "NAMM keep-all")
    targets.append((f"keep-all NAMM prefill / Full prefill, {label(4096)}", keep4["prefill"] / full4["prefill"], 1.3))
    half = run(4096, "NAMM(budget=0.5)")
    targets.append((f"NAMM(budget=0.5) prefill + {NEW_TOKENS} tokens / Full's, {label(4096)}",
                    half["total"] / full4["total"], 1.0))
    targets.append((f"NAMM(budget=0.5) decoding per token / Full's, {label(4096)}",
                    half["decode"] / full4["decode"], 0.7))
    h2o = run(1024, "H2O 25%")
    targets.append((f"H2O memory step (per step) / prefill, {label(1024)}",
                    h2o["memory"] / max(h2o["steps"], 1) / h2o["prefill"], 0.05))
    for n in (1024, 4096):
        full, base = run(n, "Full"), run(n, "transformers SDPA")
        targets.append((f"Full prefill / plain transformers, {label(n)}", full["prefill"] / base["prefill"], 1.03))
        targets.append((f"Full decoding / plain transformers, {label(n)}", full["decode"] / base["decode"], 1.03))
    if args.growth_tokens:
        base = med[("growth", 1024, "DynamicCache")]["slope"]
        for name in ("Full", "NAMM(budget=0.5)"):
            slope = med[("growth", 1024, name)]["slope"]
            targets.append((f"decoding-time slope, {name} minus DynamicCache (ms/token per 100 tokens)",
                            slope - base, None))
    lines = [
        "## NAMM and memory-step cost: the targets of issue 13",
        "",
        f"`python benchmarks/namm_cost.py --repeats {args.repeats}"
        f"{f' --threads {args.threads}' if args.threads != 2 else ''}"
        f"{f' --scale {args.scale}' if args.scale != 1 else ''}` on {args.model}, fp32, {args.threads} threads, "
        f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Medians of "
        f"{repeats} interleaved repeats; memory steps every 512 tokens (the shipped memory: 128); `Full` is the "
        "engine's default (one-pass prefill), the NAMMs prefill in chunks of their cadence. The keep-all and "
        "budgeted NAMMs read their attention features (the worst case; see the script's docstring).",
        "",
        "| target | measured | bound | met |",
        "|---|---|---|---|",
    ]
    for what, value, bound in targets:
        if bound is None:
            lines.append(f"| {what} | {value:+.3f} | <= 0 | judge against the noise (see text) |")
        elif bound < 0.5:
            lines.append(f"| {what} | {value:.1%} | {bound:.0%} | {'yes' if value <= bound else 'no'} |")
        else:
            lines.append(f"| {what} | {value:.3f}x | {bound}x | {'yes' if value <= bound else 'no'} |")
    lines += [
        "",
        "| length | configuration | prefill s | x Full | decode ms/token | memory steps s | steps | mean cache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kind, n, name), r in med.items():
        if kind != "run":
            continue
        dec = f"{r['decode'] * 1e3:.1f}" if r["total"] - r["prefill"] > 0.05 else "-"  # decoded several tokens
        lines.append(f"| {lengths[n]} | {name} | {r['prefill']:.2f} | {r['prefill'] / run(n, 'Full')['prefill']:.2f} | "
                     f"{dec} | {r['memory']:.2f} | {r['steps']} | {r['cache']:.0%} |")
    if args.growth_tokens:
        lines += ["", f"Decoding after a {lengths[1024]}-token prompt, {args.growth_tokens} tokens, one token per "
                  "forward call: mean ms/token and least-squares slope (ms/token per 100 tokens generated).", "",
                  "| cache | mean ms/token | slope |", "|---|---|---|"]
        for (kind, _n, name), r in med.items():
            if kind == "growth":
                lines.append(f"| {name} | {r['mean']:.1f} | {r['slope']:+.3f} |")
    print(write_section(args.out, "namm-cost", lines))


if __name__ == "__main__":
    main()
