"""Fit a :class:`namm.policies.distilled.DistilledScorer`: KVzip's score predicted from cached keys and values.

Three subcommands, one heavy (``collect``), two light:

``collect``: run KVzip keeping every token (budget 1.0, a memory step every 128 tokens, question in the prompt) on
synthetic and real-text training prompts, and record, for each chunk token when KVzip scores it, the features
of :func:`namm.policies.distilled.token_features` and the log of KVzip's score, per layer and KV head::

    python benchmarks/distil_kvzip.py collect --seed 8200 --samples 4 --out runs/distil/train-8200.safetensors

``fit``: ridge regression per (layer, KV head) on one or more collections; reports, on another collection, R^2
and how much of KVzip's keep set at 50% the prediction keeps (each layer's budget shared by its heads, as KVzip
ranks), and writes the scorer::

    python benchmarks/distil_kvzip.py fit --train runs/distil/train-8200.safetensors \
        --test runs/distil/test-8300.safetensors --out src/namm/checkpoints/smollm2-135m-distilled

Seeds 7000 (held out) and 5000 (selection) are refused: no held-out or selection sample is ever fitted on.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from namm.engine import generate
from namm.models import load_model
from namm.policies.base import MemoryStep
from namm.policies.distilled import DistilledScorer, token_features
from namm.policies.peers import KVzip
from namm.tasks import get_task

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "essay_recall")
RESERVED_SEEDS = {7000: "held-out evaluation", 5000: "selection"}
EPS = 1e-6


@dataclass
class _Recorder(KVzip):
    """KVzip keeping every token, recording each chunk token's features and log score when it is scored."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def score(self, step: MemoryStep) -> torch.Tensor:
        scores = super().score(step)
        fresh = step.state["kvzip"]
        chunk = step.valid & (step.positions >= step.probe.start) & (step.positions >= self.sinks)
        slots = chunk[0, 0].nonzero().squeeze(1)  # nothing is evicted: every head holds the same slots
        feats = token_features(step.keys, step.values)[0][:, slots]  # (H, n, F)
        target = torch.log(fresh[0][:, slots].clamp(min=EPS))  # (H, n)
        self.rows.setdefault(step.layer_idx, []).append((feats.half(), target.float()))
        return scores


def collect(model_name: str, seed: int, samples: int, length: int, out: Path, tasks: tuple[str, ...]) -> None:
    if seed in RESERVED_SEEDS:
        raise SystemExit(f"seed {seed} is the {RESERVED_SEEDS[seed]} seed: choose another")
    torch.set_num_threads(2)
    model, tok = load_model(model_name)
    recorder = _Recorder(budget=1.0)
    t0 = time.time()
    for name in tasks:
        task = get_task(name)
        for s in task.samples(samples, seed=seed, length=length, tokenizer=tok):
            generate(model, tok, s.prompt, recorder, max_new_tokens=1, delay=128, chunk_size=128)
        print(f"{name}: done, {time.time() - t0:.0f} s", flush=True)
    tensors = {}
    for layer, rows in recorder.rows.items():  # the managed layers (Gemma 3: the global ones)
        tensors[f"x{layer}"] = torch.cat([f for f, _ in rows], dim=1).contiguous()
        tensors[f"y{layer}"] = torch.cat([y for _, y in rows], dim=1).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "seed": str(seed), "samples": str(samples), "length": str(length),
            "tasks": ",".join(tasks)}
    save_file(tensors, str(out), metadata=meta)
    tokens = next(iter(tensors.values())).shape[1]
    print(f"wrote {out}: {len(recorder.rows)} layers, {tokens} tokens per head", flush=True)


def _load(paths: list[Path]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list[dict]]:
    xs: dict[int, list[torch.Tensor]] = {}
    ys: dict[int, list[torch.Tensor]] = {}
    metas = []
    for p in paths:
        with safe_open(str(p), "pt") as f:
            metas.append(dict(f.metadata() or {}, file=str(p)))
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                (xs if k[0] == "x" else ys).setdefault(int(k[1:]), []).append(f.get_tensor(k))
    return ({k: torch.cat(v, 1).double() for k, v in xs.items()}, {k: torch.cat(v, 1).double() for k, v in ys.items()},
            metas)


def _keep_overlap(pred: torch.Tensor, true: torch.Tensor, fraction: float) -> float:
    """Share of the true top ``fraction`` of a layer's (head, token) scores that the predicted top holds, the
    layer's budget shared by its heads. ``pred``, ``true``: ``(H, n)``."""
    k = max(1, int(fraction * true.numel()))
    top_true = set(true.flatten().topk(k).indices.tolist())
    top_pred = set(pred.flatten().topk(k).indices.tolist())
    return len(top_true & top_pred) / k


def _fit_linear(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """Ridge regression of ``y`` ``(n,)`` on ``x`` ``(n, F)`` (standardised inside): weights ``(F,)`` and bias."""
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    gram = z.T @ z + ridge * len(z) * torch.eye(x.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(gram, z.T @ (y - y.mean())) / sd
    return w.float(), float(y.mean() - w @ mu)


def _fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, seed: int) -> tuple[torch.Tensor, ...]:
    """One hidden layer (GELU) per head, fitted by Adam on the squared error; ``x`` ``(H, n, F)``, ``y`` ``(H, n)``.
    Returns the first layer ``(H, F, M)``, ``(H, M)`` with the standardisation folded in, then ``(H, M)``, ``(H,)``."""
    g = torch.Generator().manual_seed(seed)
    h, n, f = x.shape
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp(min=1e-6)
    z, ym = ((x - mu) / sd).float(), y.mean(1, keepdim=True)
    t = (y - ym).float()
    w1 = (torch.randn(h, f, hidden, generator=g) / f**0.5).requires_grad_()
    b1 = torch.zeros(h, hidden, requires_grad=True)
    w2 = (torch.randn(h, hidden, generator=g) / hidden**0.5).requires_grad_()
    b2 = torch.zeros(h, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((n + 2047) // 2048))
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(2048):
            a = torch.nn.functional.gelu(torch.einsum("hnf,hfm->hnm", z[:, idx], w1) + b1[:, None])
            pred = torch.einsum("hnm,hm->hn", a, w2) + b2[:, None]
            loss = ((pred - t[:, idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        scale = (1 / sd.squeeze(1)).float()  # (H, F)
        w1f = w1 * scale[:, :, None]
        b1f = b1 - torch.einsum("hf,hfm->hm", mu.squeeze(1).float() * scale, w1)
        return w1f, b1f, w2.detach().clone(), (b2 + ym.squeeze(1).float()).detach()


def fit(train: list[Path], test: list[Path] | None, out: Path | None, ridge: float, hidden: int = 0,
        epochs: int = 10) -> None:
    torch.set_num_threads(2)
    xs, ys, metas = _load(train)
    models = {m.get("model", "smollm2-135m") for m in metas}  # collections before session 18's last fix: SmolLM2
    if len(models) != 1:
        raise SystemExit(f"the collections come from different models: {sorted(models)}")
    layers = sorted(xs)
    n_layers = layers[-1] + 1  # unmanaged layers (Gemma 3's sliding ones) keep zero weights
    h, f = xs[layers[0]].shape[0], xs[layers[0]].shape[-1]
    hidden_w = hidden_b = None
    if hidden:
        hidden_w, hidden_b = torch.zeros(n_layers, h, f, hidden), torch.zeros(n_layers, h, hidden)
        weight, bias = torch.zeros(n_layers, h, hidden), torch.zeros(n_layers, h)
        for li in layers:
            hidden_w[li], hidden_b[li], weight[li], bias[li] = _fit_mlp(xs[li], ys[li], hidden, epochs, seed=li)
    else:
        weight, bias = torch.zeros(n_layers, h, f), torch.zeros(n_layers, h)
        for li in layers:
            for hi in range(h):
                weight[li, hi], bias[li, hi] = _fit_linear(xs[li][hi], ys[li][hi], ridge)
    scorer = DistilledScorer(weight, bias, {"model": models.pop(), "features": "value + key pair norms",
                                            "target": "log KVzip score (max reconstruction attention)",
                                            "ridge": ridge, "hidden": hidden, "epochs": epochs, "train": metas},
                             hidden_w, hidden_b)
    if test:
        tx, ty, tmetas = _load(test)
        r2, overlap = [], []
        for li in layers:
            pred = scorer.score(li, tx[li][None].float())[0].double()
            true = ty[li]
            r2.append(float(1 - ((pred - true) ** 2).sum() / ((true - true.mean(1, keepdim=True)) ** 2).sum()))
            overlap.append(_keep_overlap(pred, true, 0.5))
        summary = {"test": tmetas, "r2_by_layer": [round(v, 3) for v in r2], "r2_mean": round(sum(r2) / len(r2), 3),
                   "keep_overlap_50_by_layer": [round(v, 3) for v in overlap],
                   "keep_overlap_50_mean": round(sum(overlap) / len(overlap), 3)}
        print(json.dumps({k: v for k, v in summary.items() if k != "test"}))
        scorer.meta["test_fit"] = summary
        if not math.isfinite(summary["r2_mean"]):
            raise SystemExit("fit failed: non-finite R^2")
    if out is not None:
        scorer.save(out)
        print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--model", default="smollm2-135m", help="bundled model name, hub id or directory")
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--samples", type=int, default=4)
    c.add_argument("--length", type=int, default=2048)
    c.add_argument("--tasks", default=",".join(TASKS))
    c.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("fit")
    f.add_argument("--train", type=Path, nargs="+", required=True)
    f.add_argument("--test", type=Path, nargs="*")
    f.add_argument("--out", type=Path)
    f.add_argument("--ridge", type=float, default=1e-3)
    f.add_argument("--hidden", type=int, default=0, help="hidden units of a one-hidden-layer scorer (0: linear)")
    f.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    if args.cmd == "collect":
        collect(args.model, args.seed, args.samples, args.length, args.out, tuple(args.tasks.split(",")))
    else:
        fit(args.train, args.test, args.out, args.ridge, args.hidden, args.epochs)


if __name__ == "__main__":
    main()
