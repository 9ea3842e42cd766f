"""Runs inside the kvpress virtual environment (kvpress 0.5.x, transformers < 5.3): kvpress's presses on given ids.

Called by ``benchmarks/kvpress_check.py``; never imported by namm. Each input line holds a sample's exact token ids
(``context_ids``, ``question_ids``, as namm's engine tokenises them), so both sides see the same tokens; the
context is prefilled under the press and the question answered greedily by kvpress's own pipeline code
(``KVPressTextGenerationPipeline._forward``: one compression after the context, question-agnostic).

    .venv-kvpress/bin/python benchmarks/_kvpress_worker.py --model DIR --samples S.jsonl --out P.jsonl --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

PRESSES = {
    "streaming": lambda ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=4),
    "snapkv": lambda ratio: SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5),
    "l2": lambda ratio: KnormPress(compression_ratio=ratio),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="A transformers model directory (namm's dequantised copy).")
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=0.5, help="kvpress compression_ratio (fraction removed).")
    ap.add_argument("--presses", default="streaming,snapkv,l2")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    done = set()
    if args.out.exists():
        done = {(r["id"], r["policy"]) for r in map(json.loads, args.out.read_text().splitlines())}
    samples = [json.loads(line) for line in args.samples.read_text().splitlines()]
    with args.out.open("a") as f, torch.inference_mode():
        for sample in samples:
            for name in args.presses.split(","):
                if (sample["id"], name) in done:
                    continue
                inputs = {"context_ids": torch.tensor([sample["context_ids"]]),
                          "questions_ids": [torch.tensor([sample["question_ids"]])]}
                answer = pipe._forward(inputs, max_new_tokens=sample["max_new_tokens"], press=PRESSES[name](args.ratio))
                f.write(json.dumps({"id": sample["id"], "policy": name, "prediction": answer[0]}) + "\n")
                f.flush()


if __name__ == "__main__":
    main()
