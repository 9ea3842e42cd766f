"""A/B of the attention reuse at memory steps: prefill time with ``MemoryCache.reuse_attention`` on and off.

Reuse is switched on and off for every policy (``MemoryCache.reuse_attention``, off by default). A keep-all
NAMM that reads its attention features (``namm_cost.reading_keep_all``: a NAMM with zero parameters reads none
and asks for no attention) and H2O prefill the same prompt in chunks equal to the cadence, alternating reuse on
and off; Full (one pass) is timed in the same run for the ratio. Medians, seconds; the last column is the mean
memory step (all layers) over the whole prefill.

Usage: ``python benchmarks/attention_reuse_ab.py --length 4096 --delay 512 --repeats 2``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from namm_cost import reading_keep_all

import namm
from namm.cache import MemoryCache
from namm.policies import H2O, Full
from namm.tasks import get_task


def prefill(model, tok, prompt, policy, delay) -> tuple[float, float]:
    """Seconds of the whole prefill, and the mean seconds of one memory step (all layers) within it."""
    t0 = time.perf_counter()
    stats = namm.generate(model, tok, prompt, policy, max_new_tokens=0, delay=delay, chunk_size=delay).stats
    steps = max(len({step["n_seen"] for step in stats.steps}), 1)
    return time.perf_counter() - t0, stats.memory_seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--delay", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model("smollm2-135m")
    prompt = get_task("passkey").samples(1, seed=6200, length=args.length, tokenizer=tok)[0].prompt
    times: dict[str, list[float]] = {}
    step_times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        namm.generate(model, tok, prompt, Full(), max_new_tokens=0)
        times.setdefault("Full (one pass)", []).append(time.perf_counter() - t0)
        for reuse in (True, False):
            MemoryCache.reuse_attention = reuse
            for name, policy in (("NAMM keep-all", reading_keep_all()), ("H2O 25%", H2O(budget=0.25))):
                row = f"{name}, reuse {'on' if reuse else 'off'}"
                total, step = prefill(model, tok, prompt, policy, args.delay)
                times.setdefault(row, []).append(total)
                step_times.setdefault(row, []).append(step)
    MemoryCache.reuse_attention = False
    full = statistics.median(times["Full (one pass)"])
    print(f"\n{args.length} tokens, chunks = cadence = {args.delay}, {args.repeats} repeats, 2 threads\n")
    print("| configuration | prefill s (median) | x Full | one memory step / prefill |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        total = statistics.median(ts)
        share = f"{statistics.median(step_times[name]) / total:.1%}" if name in step_times else "-"
        print(f"| {name} | {total:.2f} | {total / full:.2f} | {share} |")


if __name__ == "__main__":
    main()
