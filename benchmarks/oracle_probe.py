"""What a graded fitness must see: decoded answers against teacher-forced scores, for classic rules and an oracle.

At one budget and cadence, every policy runs the same synthetic samples (question in the prompt); each sample
records the decoded answer's task score, the gold answer's mean NLL per token, its greedy prefix (leading
answer tokens whose teacher-forced argmax is the gold token) and the two graded fitnesses of
``namm.evolution.lm`` relative to the full cache: ``likelihood`` (``exp(-max(0, delta NLL per token))``) and
``margin`` (the soft greedy prefix relative to the full cache's). Policies:

* ``full``, ``streaming``, ``l2`` (namm's classic policies);
* ``l2win``: L2 with the 4 first tokens and the 64 newest protected (the protections of the other classic rules);
* ``oracle``: the needle's tokens (and 8 before them) and the 4 first tokens protected, the rest by recency: what
  a scorer that recognised the needle would keep;
* any registered policy (``--policies full,kvzip,snapkv``), and ``namm:DIR`` for a NAMM checkpoint at the budget.

Usage: ``python benchmarks/oracle_probe.py --task passkey --samples 8 --length 2048 --budget 0.4``
(seed 5000: the budget runs' validation samples).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from namm.engine import generate
from namm.evolution.lm import graded_score, margin_score
from namm.models import load_model
from namm.policies import make_policy
from namm.policies.base import BudgetPolicy, MemoryStep, protect, recent_mask
from namm.scoring import gold_answer
from namm.tasks import get_task


@dataclass
class L2Window(BudgetPolicy):
    """L2 with the first ``sinks`` tokens and the ``window`` newest protected."""

    name = "l2win_probe"
    window: int = 64
    sinks: int = 4

    def score(self, step: MemoryStep) -> torch.Tensor:
        sinks = step.valid & (step.positions < self.sinks)
        return protect(-step.keys.float().norm(dim=-1), recent_mask(step, self.window) | sinks)


@dataclass
class NeedleOracle(BudgetPolicy):
    """Recency, with the needle span ``[lo, hi)`` and the first ``sinks`` tokens protected."""

    name = "oracle_probe"
    span: tuple[int, int] = (0, 0)
    sinks: int = 4

    def score(self, step: MemoryStep) -> torch.Tensor:
        lo, hi = self.span
        keep = step.valid & (((step.positions >= lo) & (step.positions < hi)) | (step.positions < self.sinks))
        return protect(step.positions.float(), keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--delay", type=int, default=128)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--policies", default="full,streaming,l2,l2win,oracle",
                        help="comma-separated; full first (the reference of the fitnesses)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    task = get_task(args.task)
    samples = task.samples(args.samples, seed=args.seed, length=args.length, tokenizer=tok)
    b = args.budget
    rows: dict[str, list[dict]] = {}
    full: list[dict] = []
    names = args.policies.split(",")
    if names[0] != "full":
        parser.error("--policies must start with full (the fitnesses are relative to it)")
    for name in names:
        t0 = time.perf_counter()
        for i, s in enumerate(samples):
            needles = s.meta["needles"]
            span = (min(n["token_index"] for n in needles) - 8, max(n["token_end"] for n in needles))
            if name == "l2win":
                policy = L2Window(budget=b)
            elif name == "oracle":
                policy = NeedleOracle(budget=b, span=span)
            elif name.startswith("namm:"):
                policy = make_policy("namm", checkpoint=name[5:], budget=b)
            else:
                policy = make_policy(name) if name == "full" else make_policy(name, budget=b)
            kw = {"delay": args.delay, "chunk_size": args.delay}
            decoded = generate(model, tok, s.prompt, policy, max_new_tokens=s.max_new_tokens, **kw)
            scored = generate(model, tok, s.prompt, policy, max_new_tokens=0, answer=gold_answer(s, task), **kw).answer
            row = {"score": task.score(decoded.text, s), "nll": scored.mean_nll, "prefix": scored.greedy_prefix,
                   "tokens": scored.tokens, "logprob": scored.logprob, "margins": np.array(scored.margins)}
            if name == "full":
                full.append(row)
            ref = full[i]
            row["likelihood"] = float(graded_score(np.array([row["logprob"]]), ref["logprob"], row["tokens"])[0])
            row["margin"] = float(margin_score(row["margins"][None], ref["margins"])[0])
            rows.setdefault(name, []).append(row)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{args.task} at {args.length} tokens, budget {b:.0%}, a step every {args.delay} tokens, "
          f"{args.samples} samples, seed {args.seed}\n")
    print("| policy | answered (decoding) | mean answer NLL | greedy prefix = whole answer | likelihood fitness | "
          "margin fitness |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        whole = sum(r["prefix"] == r["tokens"] for r in rs)
        print(f"| {name} | {sum(r['score'] for r in rs):.0f}/{len(rs)} | {np.mean([r['nll'] for r in rs]):.2f} | "
              f"{whole}/{len(rs)} | {np.mean([r['likelihood'] for r in rs]):.2f} | "
              f"{np.mean([r['margin'] for r in rs]):.2f} |")


if __name__ == "__main__":
    main()
