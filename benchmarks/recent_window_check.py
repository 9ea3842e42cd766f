"""Does protecting the newest tokens help the shipped memory on Gemma 3? (session 10; answer: no)

In prompt mode the memory's last step compresses the question too, where StreamingLLM keeps it. This runs the
shipped memory with its scores lifted above all others for the newest ``W`` tokens of every step (``recentW``
cells; a subclass here, nothing in the package), beside Full, the memory and StreamingLLM, at 50% of the tokens
seen at every step (a step every 128 tokens), question in the prompt, on a seed nothing else uses, one JSON line
per (cell, sample) with the task score and the gold answer's NLL. Resumable.

    python benchmarks/recent_window_check.py --model gemma3-270m --seed 7100 --samples 4 \\
        --cells full,namm,recent128,streaming --out runs/recent-window

Measured (docs/namm.md): Full 0.74, memory 0.51, recent128 0.43, StreamingLLM 0.42 on 5 tasks x 4 samples.
Session 12 added ``shareP`` cells (the newest P% of each step's budget protected, the rest by the memory's score),
session 13 ``ckpt=DIR`` cells (another NAMM checkpoint at 50%, e.g. the evolved memory with its depth allocation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import namm
from namm.harness import run_sample
from namm.jsonl import append_record, read_records
from namm.memory import NAMM
from namm.policies import Full, StreamingLLM
from namm.policies.base import MemoryStep, protect, recent_mask
from namm.tasks import get_task


class RecentWindowNAMM(NAMM):
    """The memory, with the newest ``window`` tokens of every step scored above every other token; with ``share``,
    the window is that share of the step's budget instead (H2O's ``recent_ratio``: the rest goes by score)."""

    window = 128
    share: float | None = None

    def score(self, step: MemoryStep) -> torch.Tensor:
        window = self.window if self.share is None else int(self.budget_tokens(step).max() * self.share)
        return protect(super().score(step), recent_mask(step, window))


def make(cell: str):
    if cell == "full":
        return Full()
    if cell == "namm":
        return NAMM.from_pretrained("smollm2-135m", budget=0.5)
    if cell == "streaming":
        return StreamingLLM(budget=0.5)
    if cell.startswith("ckpt="):  # another NAMM checkpoint at the same budget (e.g. an evolved one)
        return NAMM.from_pretrained(cell[5:], budget=0.5)
    if cell.startswith("recent") and cell[6:].isdigit():
        policy = RecentWindowNAMM.from_pretrained("smollm2-135m", budget=0.5)
        policy.window = int(cell[6:])
        return policy
    if cell.startswith("share") and cell[5:].isdigit():
        policy = RecentWindowNAMM.from_pretrained("smollm2-135m", budget=0.5)
        policy.share = int(cell[5:]) / 100
        return policy
    raise SystemExit(f"unknown cell {cell!r}: use full, namm, streaming, recentW (W tokens, e.g. recent128), "
                     "shareP (P% of each step's budget, e.g. share50) or ckpt=DIR (a NAMM checkpoint at 50%).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--seed", type=int, default=7100)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--cells", default="full,namm,recent128,streaming")
    ap.add_argument("--tasks", default="passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery")
    ap.add_argument("--out", type=Path, default=Path("runs/recent-window"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"{args.model}-s{args.seed}.jsonl"
    done = {(r["cell"], r["id"]) for r in read_records(out_file).records}
    for cell in args.cells.split(","):
        policy = make(cell)
        for task_name in args.tasks.split(","):
            task = get_task(task_name)
            for sample in task.samples(args.samples, seed=args.seed, length=args.length, tokenizer=tok):
                if (cell, sample.id) in done:
                    continue
                record = run_sample(model, tok, task, sample, policy, delay=128, chunk_size=128,
                                    question_agnostic=False, score_answer=True)
                line = {"cell": cell, "id": sample.id, "task": task_name, "score": record["score"],
                        "answer_nll": record["answer_nll"], "prediction": record["prediction"][:80],
                        "answers": record["answers"], "cache_fraction": record["cache_fraction"]}
                append_record(out_file, line)
                print(cell, sample.id, line["score"], round(line["answer_nll"], 3), flush=True)


if __name__ == "__main__":
    main()
