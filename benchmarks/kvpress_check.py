"""Check namm's classic policies against kvpress's presses, run the same way (docs/leaderboard.md, issue 12).

kvpress (NVIDIA/kvpress 0.5.x) needs transformers < 5.3, so it runs from its own virtual environment
(``--venv``, created with ``--setup``), never as a dependency of namm. Both sides get the same token ids: the
samples (passkey and niah_single at 1k and 2k tokens, seed 7000) are tokenised here as namm's engine does in
question-agnostic mode; the context is prefilled and compressed once at 50% (kvpress: ``compression_ratio=0.5``
inside its pipeline; namm: ``question=`` with a cadence longer than the prompt, so the only memory step is the
one at the end of the context), then the question is answered greedily. Scores use namm's task metrics for
both, and the table counts the samples where the two agree on right/wrong.

    python benchmarks/kvpress_check.py --setup              # once: creates .venv-kvpress (PyPI: kvpress, torch)
    python benchmarks/kvpress_check.py --samples 8          # resumable; writes runs/kvpress-check and the doc
    python benchmarks/kvpress_check.py --skip-kvpress ...   # namm's side only (e.g. to try it on a tiny model)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {"streaming": "StreamingLLMPress(n_sink=4)", "snapkv": "SnapKVPress(window_size=64, kernel_size=5)",
         "l2": "KnormPress"}
# torch pinned to the CPU wheel on this machine's disk: a looser requirement pulls a multi-GB CUDA build.
REQUIREMENTS = ["torch==2.13.0", "kvpress>=0.5,<0.6", "transformers>=4.56,<5.3", "accelerate"]


def setup(env: Path) -> Path:
    """Create the kvpress virtual environment (idempotent); return its python."""
    python = env / "bin" / "python"
    if not python.exists():
        venv.create(env, with_pip=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    return python


def namm_policy(name: str, ratio: float):
    from namm.policies import L2Norm, SnapKV, StreamingLLM

    keep = 1.0 - ratio
    return {"streaming": StreamingLLM(budget=keep, sinks=4), "snapkv": SnapKV(budget=keep, window=64, kernel=5),
            "l2": L2Norm(budget=keep)}[name]


def build_samples(tok, tasks, lengths, n, seed):
    from namm.tasks import get_task

    out = []
    for task_name in tasks:
        task = get_task(task_name)
        for length in lengths:
            for s in task.samples(n, seed=seed, length=length, tokenizer=tok):
                out.append((task, length, s))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-kvpress")
    ap.add_argument("--setup", action="store_true", help="Create/refresh the kvpress virtual environment first.")
    ap.add_argument("--skip-kvpress", action="store_true", help="Run namm's side only.")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--ratio", type=float, default=0.5, help="Fraction of the context removed (kvpress's ratio).")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kvpress-check")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "leaderboard.md")
    args = ap.parse_args()

    import namm
    from namm.bench.leaderboard import write_section
    from namm.models import resolve

    python = setup(args.venv) if args.setup else args.venv / "bin" / "python"
    if not args.skip_kvpress and not python.exists():
        raise SystemExit(f"no kvpress environment at {args.venv}; run with --setup first")
    model, tok = namm.load_model(args.model)
    samples = build_samples(tok, args.tasks, args.lengths, args.samples, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    ids_file = args.out / "samples.jsonl"
    ids_file.write_text("".join(json.dumps({
        "id": f"{s.id}@{length}", "context_ids": tok(s.context)["input_ids"],
        "question_ids": tok(s.question, add_special_tokens=False)["input_ids"], "max_new_tokens": s.max_new_tokens,
    }) + "\n" for _, length, s in samples))

    ours_file = args.out / "namm.jsonl"
    done = {(r["id"], r["policy"]) for r in read_jsonl(ours_file)}
    with ours_file.open("a") as f:
        for _, length, s in samples:
            for name in ["full", *PAIRS]:
                key = (f"{s.id}@{length}", name)
                if key in done:
                    continue
                policy = namm.policies.Full() if name == "full" else namm_policy(name, args.ratio)
                out = namm.generate(model, tok, s.context, policy, question=s.question, delay=8192, chunk_size=512,
                                    max_new_tokens=s.max_new_tokens)
                f.write(json.dumps({"id": key[0], "policy": name, "prediction": out.text,
                                    "cache_fraction": out.stats.cache_fraction}) + "\n")
                f.flush()
    kvpress_file = args.out / "kvpress.jsonl"
    if not args.skip_kvpress:
        subprocess.run([str(python), str(ROOT / "benchmarks" / "_kvpress_worker.py"), "--model", resolve(args.model),
                        "--samples", str(ids_file), "--out", str(kvpress_file), "--ratio", str(args.ratio),
                        "--presses", ",".join(PAIRS)], check=True)

    ours = {(r["id"], r["policy"]): r for r in read_jsonl(ours_file)}
    theirs = {(r["id"], r["policy"]): r for r in read_jsonl(kvpress_file)}
    lines = [
        "## Check against kvpress: the classic policies, question-agnostic, "
        f"{args.ratio:.0%} compression", "",
        f"`python benchmarks/kvpress_check.py --model {args.model} --samples {args.samples} --seed {args.seed}` "
        f"(kvpress from `{args.venv.name}`, transformers < 5.3). Same token ids on both sides; the context is "
        "compressed once after its prefill, then the question is answered greedily; namm's task metrics score "
        "both. Agree: samples where both are right or both wrong.", "",
        "| task | length | policy (kvpress press) | Full | kvpress | namm | agree | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(t for t, _, _ in samples):
        for length in args.lengths:
            group = [s for t, n, s in samples if t is task and n == length]
            full = [task.score(ours[(f"{s.id}@{length}", "full")]["prediction"], s) for s in group]
            for name, press in PAIRS.items():
                keys = [(f"{s.id}@{length}", name) for s in group]
                a = [task.score(ours[k]["prediction"], s) for k, s in zip(keys, group, strict=True)]
                b = [task.score(theirs[k]["prediction"], s) if k in theirs else None for k, s in
                     zip(keys, group, strict=True)]
                shared = [(x, y) for x, y in zip(a, b, strict=True) if y is not None]
                agree = sum((x > 0) == (y > 0) for x, y in shared)
                kv = f"{100 * sum(y for _, y in shared) / len(shared):.0f}" if shared else "not run"
                lines.append(f"| {task.name} | {length} | {name} ({press}) | {100 * sum(full) / len(full):.0f} | "
                             f"{kv} | {100 * sum(a) / len(a):.0f} | {agree}/{len(shared)} | {len(group)} |")
    lines += ["", "Known differences in the rules: a fractional budget keeps `ceil(n x keep)` tokens per head in namm "
              "and `int(n x keep)` in kvpress (at most one token apart); namm lifts protected tokens (sinks, the "
              "SnapKV window) above every score, kvpress pads the window's scores with the maximum score, so ties "
              "may break differently."]
    write_section(args.doc, "kvpress-check", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
