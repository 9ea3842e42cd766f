"""Does max-pooling the memory's scores over neighbouring tokens keep needles whole? (session 10)

On Gemma 3 270M (namm-gemma, seed 7000) the shipped memory's wrong answers were mostly needles with one digit
missing ("227287" for 2272877): each digit is a token and the memory kept all but one. This script runs, on a
fresh seed that nothing else uses, Full, the shipped memory, the shipped memory with ``score_pool`` (its scores
max-pooled over a window of neighbouring slots before the top-k) and StreamingLLM, every policy at 50% of the
tokens seen at every step (a step every 128 tokens), question in the prompt, and writes one JSON line per
(policy, sample) with the task score and the gold answer's NLL.

    python benchmarks/score_pool_check.py --model gemma3-270m --seed 7100 --samples 6 --out runs/score-pool-gemma
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import namm
from namm.harness import run_sample
from namm.memory import NAMM
from namm.policies import Full, StreamingLLM
from namm.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tasks", default="passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery")
    ap.add_argument("--seed", type=int, default=7100)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--pool", type=int, nargs="+", default=[3])
    ap.add_argument("--policies", default="full,namm,pool,streaming")
    ap.add_argument("--out", type=Path, default=Path("runs/score-pool-gemma"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model(args.model)
    shipped = NAMM.from_pretrained("smollm2-135m", budget=0.5)
    policies = {"full": Full(), "namm": shipped, "streaming": StreamingLLM(budget=0.5)}
    for k in args.pool:
        pooled = NAMM.from_pretrained("smollm2-135m", budget=0.5)
        pooled.config = dataclasses.replace(pooled.config, score_pool=k)
        policies[f"pool{k}"] = pooled
    wanted = [p for name in args.policies.split(",") for p in ([f"pool{k}" for k in args.pool] if name == "pool"
                                                                 else [name])]
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"{args.model}-s{args.seed}.jsonl"
    done = set()
    if out_file.exists():
        done = {(r["cell"], r["id"]) for r in map(json.loads, out_file.read_text().splitlines())}
    for name in wanted:
        for task_name in args.tasks.split(","):
            task = get_task(task_name)
            for sample in task.samples(args.samples, seed=args.seed, length=args.length, tokenizer=tok):
                if (name, sample.id) in done:
                    continue
                record = run_sample(model, tok, task, sample, policies[name], delay=128, chunk_size=128,
                                    question_agnostic=False, score_answer=True)
                line = {"cell": name, "id": sample.id, "task": task_name, "score": record["score"],
                        "answer_nll": record["answer_nll"], "prediction": record["prediction"][:80],
                        "answers": record["answers"], "cache_fraction": record["cache_fraction"]}
                with out_file.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                print(name, sample.id, line["score"], round(line["answer_nll"], 3), repr(line["prediction"][:40]),
                      flush=True)


if __name__ == "__main__":
    main()
