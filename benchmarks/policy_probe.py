"""Decoded answers of a few policy variants on one synthetic task: the quick selection runs of docs/evolution.md.

Each configuration is ``NAME[,key=value...]``: ``NAME`` a registered policy (``full``, ``streaming``, ``kvzip``,
...) or ``namm:DIR`` (a NAMM checkpoint at the budget); ``temp=T,floor=F`` gives it a head allocation fitted to
the retrieval-head scores of ``benchmarks/retrieval_heads.py`` (``--scores``); ``per_head=1`` is KVzip's option.
Every policy runs at ``--budget`` of the tokens seen, a memory step every 128 tokens, question in the prompt.

Usage: ``python benchmarks/policy_probe.py passkey 8 2048 0.48 "streaming;streaming,temp=0.5,floor=0.03;kvzip"``
(seed 5000: the selection samples, used by no held-out result).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from namm.engine import generate
from namm.memory.policy import NAMM
from namm.models import load_model
from namm.policies import make_policy
from namm.policies.allocation import HeadAllocation, fit_head_logits
from namm.tasks import get_task


def main() -> None:
    if len(sys.argv) < 6:
        raise SystemExit(__doc__)
    task_name, n, length, budget, configs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
        sys.argv[5].split(";")
    scores_file = sys.argv[6] if len(sys.argv) > 6 else "runs/retrieval-heads/scores.json"
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    task = get_task(task_name)
    samples = task.samples(n, seed=5000, length=length, tokenizer=tok)
    for cfg in configs:
        name, *opts = cfg.split(",")
        kw = {k: float(v) for k, v in (o.split("=") for o in opts)}
        alloc = None
        if "temp" in kw:
            scores = torch.tensor(json.loads(Path(scores_file).read_text())["scores"])
            alloc = HeadAllocation(tuple(map(tuple, fit_head_logits(scores, kw["temp"]).tolist())), kw.get("floor", 0))
        t0, total, fractions, peaks = time.time(), 0.0, [], []
        for s in samples:
            if name == "full":
                policy = make_policy(name)
            elif name.startswith("namm:"):
                policy = NAMM.from_pretrained(name[5:], budget=budget)
                policy.head_allocation = alloc
            else:
                extra = {k: bool(v) for k, v in kw.items() if k == "per_head"}
                policy = make_policy(name, budget=budget, allocation=alloc, **extra)
            out = generate(model, tok, s.prompt, policy, max_new_tokens=s.max_new_tokens, delay=128, chunk_size=128)
            total += task.score(out.text, s)
            fractions.append(out.stats.cache_fraction)
            peaks.append(out.stats.peak_kv_bytes)
        print(f"{cfg}: {total:.1f}/{n} answered, cache {sum(fractions) / len(fractions):.3f}, "
              f"peak KV {sum(peaks) / len(peaks) / 1e6:.1f} MB, "
              f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
