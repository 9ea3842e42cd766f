"""Cost of NAMM's memory steps: prefill time with NAMM vs the Full engine, side by side in one run.

A zero-parameter NAMM keeps every token, so its prefill does exactly the Full engine's work plus the
memory steps at full cache size (the worst case); an evicting NAMM (a CMA-ES-like random member) is
shown for context. The reference approach (eager attention everywhere, ``output_attentions``) is
measured too where it fits in memory.

    python benchmarks/namm_cost.py --lengths 2048 4096 --repeats 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from _report import make_ids, write_section

import namm
from namm.policies import Full


@torch.inference_mode()
def eager_reference(model, ids: torch.Tensor) -> float:
    """The reference's approach: eager attention returning every layer's maps, in 512-token chunks."""
    from transformers import DynamicCache  # noqa: PLC0415

    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        for start in range(0, ids.shape[1], 512):
            model(ids[:, start : start + 512], past_key_values=cache, output_attentions=True, logits_to_keep=1)
        return time.perf_counter() - t0
    finally:
        model.set_attn_implementation("namm")


def run(model, tok, ids, policy, delay) -> dict:
    out = namm.generate(model, tok, ids[0], policy, max_new_tokens=1, delay=delay, chunk_size=delay,
                        ignore_eos=True)
    return {"prefill": out.stats.prefill_seconds, "memory": out.stats.memory_seconds,
            "cache": out.stats.cache_fraction}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--delay", type=int, default=512)
    ap.add_argument("--checkpoint", default=None, help="An evolved NAMM to time as well.")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = namm.load_model(args.model)
    keep_all = namm.NAMM()
    member = namm.NAMM()
    member.set_params(torch.randn(member.n_params, generator=torch.Generator().manual_seed(0)) * 0.065)
    configs = {f"Full (engine, {args.delay}-token chunks)": Full(), "NAMM, zero params (keeps all)": keep_all,
               "NAMM, random member (evicts)": member}
    delays = dict.fromkeys(configs, args.delay)
    against: dict[str, str] = {}  # row -> the Full row it is compared with (default: Full at --delay)
    if args.checkpoint:  # timed at the cadence it was evolved with, next to Full at that cadence
        evolved = namm.NAMM.from_pretrained(args.checkpoint)
        d = evolved.config.delay
        name, full_name = f"NAMM, evolved (step every {d})", f"Full (engine, {d}-token chunks)"
        configs[name], configs[full_name] = evolved, Full()
        delays.update({name: d, full_name: d})
        against[name] = full_name
    rows = {}
    for length in args.lengths:
        ids = make_ids(tok, length)
        runs: dict[str, list[dict]] = {k: [] for k in configs}
        runs["eager reference (output_attentions)"] = []
        for rep in range(args.repeats):
            for name, policy in configs.items():
                runs[name].append(run(model, tok, ids, policy, delays[name]))
                print(f"[{length}] rep {rep} {name}: {runs[name][-1]}", flush=True)
            runs["eager reference (output_attentions)"].append({"prefill": eager_reference(model, ids),
                                                                 "memory": 0.0, "cache": 1.0})
        rows[length] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    write(args, rows, against)


def write(args, rows, against: dict[str, str]) -> None:
    lines = [
        "## NAMM memory-step cost (issue 3)",
        "",
        f"`python benchmarks/namm_cost.py --lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats}"
        f"{' --checkpoint ' + args.checkpoint if args.checkpoint else ''}` "
        f"on {args.model}, fp32, 2 threads, {platform.machine()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Medians of {args.repeats} interleaved repeats, memory step every "
        f"{args.delay} tokens (the evolved NAMM: at the cadence it was evolved with), engine runs prefill in "
        "chunks of the memory-step cadence. Ratios are against the Full engine at the default cadence, the "
        "evolved NAMM's against Full at its own cadence, measured in the same run.",
        "",
        "| length | configuration | prefill s | x Full | memory steps s | mean cache |",
        "|---|---|---|---|---|---|",
    ]
    for length, table in rows.items():
        for name, r in table.items():
            base = table[against.get(name, f"Full (engine, {args.delay}-token chunks)")]["prefill"]
            lines.append(f"| {length} | {name} | {r['prefill']:.2f} | {r['prefill'] / base:.2f} | "
                         f"{r['memory']:.2f} | {r['cache']:.0%} |")
    print(write_section(args.out, "namm-cost", lines))


if __name__ == "__main__":
    main()
