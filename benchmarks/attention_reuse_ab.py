"""A/B of the attention reuse at memory steps: prefill time with ``MemoryCache.reuse_attention`` on and off.

Reuse is switched on and off for every policy (``MemoryCache.reuse_attention``, off by default). A keep-all
NAMM that reads its attention features (``namm_cost.reading_keep_all``: a NAMM with zero parameters reads none
and asks for no attention) and H2O prefill the same prompt in chunks equal to the cadence, alternating reuse on
and off; Full (one pass) is timed in the same run for the ratio. Medians of the prefill seconds namm's engine
reports (``_report.engine``); the last column is the mean memory step (all layers) over the whole prefill.

Usage: ``python benchmarks/attention_reuse_ab.py --length 4096 --delay 512 --repeats 2``
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _report import engine
from namm_cost import reading_keep_all

import namm
from namm.cache import MemoryCache
from namm.policies import H2O, Full
from namm.tasks import get_task


def prefill(model, tok, ids, policy, delay) -> tuple[float, float]:
    """Seconds of the whole prefill, and the mean seconds of one memory step (all layers) within it."""
    r = engine(model, tok, ids, policy, 0, chunk=delay, delay=delay)
    return r["prefill"], r["memory"] / max(r["steps"], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--delay", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model("smollm2-135m")
    prompt = get_task("passkey").samples(1, seed=6200, length=args.length, tokenizer=tok)[0].prompt
    ids = tok(prompt, return_tensors="pt").input_ids  # (1, T), as namm.generate encodes the prompt
    times: dict[str, list[float]] = {}
    step_times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        times.setdefault("Full (one pass)", []).append(engine(model, tok, ids, Full(), 0)["prefill"])
        for reuse in (True, False):
            MemoryCache.reuse_attention = reuse
            for name, policy in (("NAMM keep-all", reading_keep_all()), ("H2O 25%", H2O(budget=0.25))):
                row = f"{name}, reuse {'on' if reuse else 'off'}"
                total, step = prefill(model, tok, ids, policy, args.delay)
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
