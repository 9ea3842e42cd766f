"""Runtime benchmark: plain transformers SDPA vs namm's engine with Full and each policy at a 25% budget.

Measures, on the bundled SmolLM2 at several context lengths, the median over repeats of prefill time,
per-token decode time, memory-step time and peak KV bytes. Configurations are interleaved within each
repeat so that machine noise hits them alike; ratios are taken within one run.

    python benchmarks/runtime.py --lengths 1024 2048 4096 --repeats 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from _report import engine, make_ids, plain_transformers, write_section

import namm
from namm.policies import H2O, Full, L2Norm, Random, SnapKV, StreamingLLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--delay", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model(args.model)
    configs = {
        "transformers SDPA": None,
        "namm Full": Full(),
        "StreamingLLM 25%": StreamingLLM(budget=0.25),
        "H2O 25%": H2O(budget=0.25),
        "L2Norm 25%": L2Norm(budget=0.25),
        "SnapKV 25%": SnapKV(budget=0.25),
        "Random 25%": Random(budget=0.25),
    }
    rows = {}
    warm = make_ids(tok, 256)
    plain_transformers(model, warm, 4)
    engine(model, tok, warm, Full(), 4, delay=args.delay)
    for length in args.lengths:
        ids = make_ids(tok, length)
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for rep in range(args.repeats):
            for name, policy in configs.items():
                r = plain_transformers(model, ids, args.new_tokens) if policy is None else engine(
                    model, tok, ids, policy, args.new_tokens, delay=args.delay
                )
                r["memory"] /= max(r["steps"], 1)  # the table reports one memory step
                runs[name].append(r)
                print(f"[{length}] rep {rep} {name}: prefill {r['prefill']:.2f}s decode {r['decode'] * 1e3:.1f}ms "
                      f"memory-step {r['memory']:.3f}s peak KV {r['peak_kv'] / 2**20:.1f} MiB", flush=True)
        rows[length] = {
            name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
        }
    write_report(args, rows)


def write_report(args, rows) -> None:
    lines = [
        "## Runtime: prefill, decoding and KV memory (issue 2)",
        "",
        f"`python benchmarks/runtime.py --lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats} "
        f"--new-tokens {args.new_tokens}` on {args.model}, fp32, 2 threads, "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. Medians of {args.repeats} interleaved repeats; "
        f"memory step every {args.delay} tokens; budgets are 25% of the tokens seen. Ratios are against "
        "plain transformers (SDPA, one-shot prefill, `DynamicCache`) measured in the same run.",
        "",
    ]
    for length, table in rows.items():
        base = table["transformers SDPA"]
        full = table["namm Full"]
        lines += [
            f"### {length} tokens",
            "",
            "| configuration | prefill s | x plain | decode ms/token | x Full | memory step s | step / prefill "
            "| peak KV MiB | final KV / Full |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in table.items():
            final = r.get("final_kv", r["peak_kv"])
            lines.append(
                f"| {name} | {r['prefill']:.2f} | {r['prefill'] / base['prefill']:.3f} | {r['decode'] * 1e3:.1f} | "
                f"{r['decode'] / full['decode']:.2f} | {r['memory']:.3f} | {r['memory'] / r['prefill']:.1%} | "
                f"{r['peak_kv'] / 2**20:.1f} | {final / full.get('final_kv', full['peak_kv']):.0%} |"
            )
        lines.append("")
    print(write_section(args.out, "runtime", lines))


if __name__ == "__main__":
    main()
