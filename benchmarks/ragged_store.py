"""Storing each KV head apart (ragged) against padding every head to the longest: KV memory, time, outputs.

A policy that shares a layer's budget between its heads (the shipped memory, KVzip, AdaKV) keeps nearly every
token in some heads and few in others. Padded to its longest head, a layer then stores far more than it keeps;
stored apart, it stores what it keeps (:mod:`namm.store`). Each policy runs the same prompt both ways
(``namm.store.RAGGED_MIN_SAVING`` 1.0 switches the ragged store off), plus Full and StreamingLLM (equal budgets
per head: never ragged) for the ratios, all in one run. Reported: peak and final KV bytes over Full's, the share
of stored slots that are padding, prefill seconds and decoding ms per token (medians over repeats, interleaved),
and whether the greedy tokens are the same both ways (the largest logit difference beside it).

Usage: ``python benchmarks/ragged_store.py --length 2048 --repeats 2 --new-tokens 32``
"""

from __future__ import annotations

import argparse
import statistics

import torch

import namm
import namm.store
from namm.memory import NAMM
from namm.policies import AdaKV, Full, KVzip, StreamingLLM
from namm.tasks import get_task

DELAY = 128  # the shipped memory's cadence (the namm-recon suites)


def policies(budget: float) -> dict:
    return {
        "shipped memory": lambda: NAMM.from_pretrained("smollm2-135m", budget=budget),
        "KVzip": lambda: KVzip(budget=budget),
        "AdaKV": lambda: AdaKV(budget=budget),
        "StreamingLLM": lambda: StreamingLLM(budget=budget),
    }


def run(model, tok, prompt: str, policy, new_tokens: int, ragged: bool) -> dict:
    saving = namm.store.RAGGED_MIN_SAVING
    namm.store.RAGGED_MIN_SAVING = saving if ragged else 1.0
    try:
        out = namm.generate(model, tok, prompt, policy, max_new_tokens=new_tokens, delay=DELAY, chunk_size=DELAY,
                            ignore_eos=True, return_logits=True)
    finally:
        namm.store.RAGGED_MIN_SAVING = saving
    s = out.stats
    return {"prefill": s.prefill_seconds, "decode": 1000 * s.decode_seconds / max(s.generated_tokens[0] - 1, 1),
            "peak": s.peak_kv_bytes, "final": s.kv_bytes, "padding": s.padding_fraction, "cache": s.cache_fraction,
            "tokens": out.token_ids, "logits": out.logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--task", default="niah_multikey")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model("smollm2-135m")
    prompt = get_task(args.task).samples(1, seed=6300, length=args.length, tokenizer=tok)[0].prompt
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        rows.setdefault("Full", []).append(run(model, tok, prompt, Full(), args.new_tokens, True))
        for name, make in policies(args.budget).items():
            for ragged in (True, False):
                label = f"{name}, heads {'apart' if ragged else 'padded'}"
                rows.setdefault(label, []).append(run(model, tok, prompt, make(), args.new_tokens, ragged))
    full = rows["Full"][0]
    print(f"\n{args.task} at {args.length} tokens, every policy at {args.budget:.0%} of the tokens seen, a memory "
          f"step every {DELAY}, {args.new_tokens} new tokens; medians of {args.repeats} interleaved repeats, "
          "2 threads\n")
    print("| configuration | mean cache | peak KV x Full | final KV x Full | padding | prefill s | decode ms/token "
          "| same tokens as the other layout (max logit diff) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in rows.items():
        r = runs[0]
        other = label.replace("apart", "padded") if "apart" in label else label.replace("padded", "apart")
        same = "-"
        if other != label and other in rows:
            o = rows[other][0]
            diff = (r["logits"] - o["logits"]).abs().max().item()
            same = f"{'yes' if r['tokens'] == o['tokens'] else 'no'} ({diff:.1e})"
        print(f"| {label} | {r['cache']:.0%} | {r['peak'] / full['peak']:.2f} | {r['final'] / full['final']:.2f} "
              f"| {r['padding']:.0%} | {statistics.median(x['prefill'] for x in runs):.2f} "
              f"| {statistics.median(x['decode'] for x in runs):.1f} | {same} |")


if __name__ == "__main__":
    main()
