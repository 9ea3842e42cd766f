"""Which KV heads retrieve? Per (layer, KV head), the attention the answer gives the needle on full-cache runs.

For synthetic prompts (passkey / NIAH) with the gold answer appended (teacher-forced), one eager forward with
``output_attentions``; for every layer and KV head, the attention mass that the queries predicting the answer
tokens (the last prompt token and all answer tokens but the last) put on the needle tokens, averaged over the
query heads of the KV head, the answer queries and the samples. A head that reads the needle to answer is a
*retrieval head* (DuoAttention, Xiao et al., 2024, arXiv 2410.10819; RazorAttention, Tang et al., 2024, arXiv
2407.15891): it needs its distant tokens, while the others read mostly sinks and recent tokens.

The scores are the oracle labels of the fitted head allocation (:func:`namm.policies.allocation.fit_head_logits`).
Samples come from a seed that no evaluation uses (7100 by default: training data).

Usage: ``python benchmarks/retrieval_heads.py --tasks passkey,niah_single,niah_multikey,niah_multivalue
--samples 4 --length 1024 --out runs/retrieval-heads/scores.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from namm.atomic import atomic_write_json
from namm.models import load_model
from namm.scoring import gold_answer
from namm.tasks import get_task


def needle_mass(attentions: tuple[torch.Tensor, ...], n_kv: int, queries: slice, needle: np.ndarray) -> np.ndarray:
    """``(L, H_kv)`` attention mass the ``queries`` rows put on the ``needle`` columns, averaged over query heads
    and rows. ``attentions``: per layer ``(1, H_q, T, T)``."""
    cols = torch.from_numpy(needle)
    out = []
    for att in attentions:
        a = att[0, :, queries][..., cols].sum(-1).mean(-1)  # (H_q,)
        out.append(a.view(n_kv, -1).mean(-1).float().numpy())
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="passkey,niah_single,niah_multikey,niah_multivalue")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=7100)
    parser.add_argument("--out", type=Path, default=Path("runs/retrieval-heads/scores.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model)
    model.set_attn_implementation("eager")
    n_kv = model.config.num_key_value_heads
    per_sample = []
    for name in args.tasks.split(","):
        task = get_task(name)
        for s in task.samples(args.samples, seed=args.seed, length=args.length, tokenizer=tok):
            prompt = tok(s.prompt, return_tensors="pt").input_ids
            answer = tok(gold_answer(s, task), add_special_tokens=False, return_tensors="pt").input_ids
            ids = torch.cat([prompt, answer], dim=1)
            p, a = prompt.shape[1], answer.shape[1]
            with torch.no_grad():
                out = model(ids, output_attentions=True, use_cache=False)
            needle = np.zeros(ids.shape[1], bool)
            for n in s.meta["needles"]:
                needle[n["token_index"]:n["token_end"]] = True
            per_sample.append(needle_mass(out.attentions, n_kv, slice(p - 1, p + a - 1), needle))
            print(f"{name}: sample {len(per_sample)}", flush=True)
    scores = np.stack(per_sample)  # (S, L, H)
    mean = scores.mean(0)
    atomic_write_json(args.out, {"model": args.model, "tasks": args.tasks.split(","), "samples": args.samples,
                          "length": args.length, "seed": args.seed, "scores": mean.tolist(),
                          "std": scores.std(0).tolist()})
    order = np.argsort(-mean.ravel())
    print("top heads (layer, head): mass")
    for i in order[:20]:
        layer, head = divmod(int(i), mean.shape[1])
        print(f"  ({layer}, {head}): {mean.ravel()[i]:.3f}")
    print(json.dumps({"sum": float(mean.sum()), "heads": int(mean.size)}))


if __name__ == "__main__":
    main()
