"""Which parts of a needle and of the question each managed layer still holds after the last memory step.

Diagnoses a budgeted policy on a synthetic task (question in the prompt): for every sample, the decoded answer,
and per managed layer how many tokens of the gold value, of the sentence that names its key, and of the question
survived the prompt's last memory step. Written for Gemma 3's three global layers (docs/results.md, session 11).

    python benchmarks/kept_spans.py --model gemma3-270m --task niah_multikey --seed 7100 --samples 3 \\
        --policy kvzip --budget 0.5
    python benchmarks/kept_spans.py --policy namm:smollm2-135m ...   # a NAMM checkpoint at the budget
"""

from __future__ import annotations

import argparse

import torch

from namm.engine import generate
from namm.memory import NAMM
from namm.models import load_model
from namm.policies import make_policy
from namm.tasks import get_task


def tokens(offsets: list[tuple[int, int]], lo: int, hi: int) -> list[int]:
    """Indices of the tokens whose characters overlap ``[lo, hi)`` of the text."""
    return [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]


def spy(policy, log: list):
    """Wrap ``policy.keep`` to record each step's kept absolute positions per layer (row 0, kept by any KV head)."""
    keep = policy.keep

    def recording(step, scores):
        mask = keep(step, scores)
        log.append((step.layer_idx, step.n_seen, set(step.positions[0][mask[0]].flatten().tolist())))
        return mask

    policy.keep = recording
    return policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="niah_multikey")
    ap.add_argument("--seed", type=int, default=7100)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--policy", default="kvzip", help="a registered budgeted policy, or namm:CHECKPOINT")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--delay", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model)
    task = get_task(args.task)
    for s in task.samples(args.samples, seed=args.seed, length=args.length, tokenizer=tok):
        log: list = []
        if args.policy.startswith("namm:"):
            policy = NAMM.from_pretrained(args.policy[5:], budget=args.budget)
        else:
            policy = make_policy(args.policy, budget=args.budget)
        out = generate(model, tok, s.prompt, spy(policy, log), max_new_tokens=s.max_new_tokens, delay=args.delay,
                       chunk_size=args.delay)
        enc = tok(s.prompt, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(enc["input_ids"])
        question = n - len(tok(s.question, add_special_tokens=False)["input_ids"])

        gold = s.answers[0]
        at = s.prompt.find(gold)
        value = tokens(offsets, at, at + len(gold)) if at >= 0 else []
        sentence = s.prompt.rfind(".", 0, at) + 1 if at >= 0 else 0
        key = tokens(offsets, sentence, at) if at >= 0 else []
        print(f"{s.id}: answer {out.text.strip()[:24]!r}, gold {gold!r}, score {task.score(out.text, s)}; "
              f"value at tokens {value[:1]}..{value[-1:]} of {n}")
        last = {}
        for layer, seen, kept in log:
            if seen <= n:
                last[layer] = kept
        for layer, kept in sorted(last.items()):
            def share(ids: list[int], kept: set = kept) -> str:
                return f"{sum(i in kept for i in ids)}/{len(ids)}"
            print(f"  layer {layer:2d}: value {share(value)}, key sentence {share(key)}, "
                  f"question {share(list(range(question, n)))}, all {len(kept)}/{n}")
        if at < 0:
            print("  (the gold value is not in the prompt verbatim)")


if __name__ == "__main__":
    main()
