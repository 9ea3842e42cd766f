"""Cost of the shipped reconstruction memory against KVzip and Full, measured in one run on the same prompts.

The shipped NAMM ranks tokens as KVzip does (docs/evolution.md, "third design"). Until session 9 it also
computed the NAMM's forward-attention features (the attention recompute, the spectrogram) whose weights are zero;
since then a NAMM skips the attention features that no weight reads (``NAMM.reads_attention``). This
script runs Full, KVzip and the shipped NAMM alternately on the same passkey prompts (seed 4243, used by nothing
else) and prints median seconds per sample: total, of which the probe, and the memory steps, and the ratio to Full.

Usage: ``python benchmarks/recon_cost.py --length 2048 --samples 2 --repeats 2`` (on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from namm.engine import generate
from namm.memory import NAMM
from namm.models import load_model
from namm.policies import Full, KVzip
from namm.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    samples = get_task("passkey").samples(args.samples, seed=4243, length=args.length, tokenizer=tok)
    policies = {"full": Full, "kvzip": lambda: KVzip(budget=0.5), "namm": lambda: NAMM.from_pretrained("smollm2-135m")}
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in policies}
    for _ in range(args.repeats):
        for s in samples:
            for name, make in policies.items():
                out = generate(model, tok, s.prompt, make(), max_new_tokens=s.max_new_tokens, delay=128,
                               chunk_size=128)
                st = out.stats
                times[name].append((st.prefill_seconds + st.decode_seconds, st.probe_seconds, st.memory_seconds))
    full = statistics.median(t[0] for t in times["full"])
    print(f"passkey at {args.length} tokens, {args.samples} samples x {args.repeats} repeats, medians per sample\n")
    print("| policy | seconds | x Full | probe s | memory-step s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        total = statistics.median(t[0] for t in ts)
        print(f"| {name} | {total:.1f} | {total / full:.2f} | {statistics.median(t[1] for t in ts):.1f} | "
              f"{statistics.median(t[2] for t in ts):.1f} |")


if __name__ == "__main__":
    main()
