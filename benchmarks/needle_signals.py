"""Which per-token attention signals mark the needles? AUROC of needle vs haystack tokens, per head.

For synthetic prompts (passkey / NIAH), one eager forward with ``output_attentions`` per sample; for every
layer and head, each haystack token gets a value of several candidate features and the AUROC of the needle
tokens against the other haystack tokens is averaged over the samples (0.5 = no signal; far from 0.5 in
either direction = a usable signal, since a scorer can learn the sign):

* ``received``: mean attention the token receives from the later queries (what H2O and the NAMM's
  spectrogram build on);
* ``query_entropy``: entropy of the token's own attention row as a query, divided by ``log(position + 2)``
  (a token that copies an earlier one, as repeated filler does, attends sharply; a novel one does not);
* ``kv_query_entropy``: the same over the row averaged across the query heads of each KV head, which is
  what a memory step of our cache sees (``(B, H_kv, Q, T)``);
* ``layer_query_entropy``: the latter standardised per head and averaged over the layer's KV heads;
* ``key_norm``: the L2 norm of the token's cached (post-RoPE) key, per KV head (what L2 builds on);
* ``key_novelty``: one minus the cosine of the key with the head's mean key over the prompt (KeyDiff's rule,
  Park et al., 2025, arXiv 2504.15364: repeated filler sits near the mean, a unique needle away from it);
* ``key_redundancy``: the largest cosine of the key with any other key of the head (a near copy elsewhere
  in the cache makes a token redundant).

Usage: ``python benchmarks/needle_signals.py --tasks passkey,niah_single,niah_multikey --samples 2
--length 1024`` (SmolLM2; seed 6100 is used by no training, validation or benchmark run).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from namm.models import load_model
from namm.tasks import get_task

FEATURES = ("received", "query_entropy", "kv_query_entropy", "layer_query_entropy", "key_norm", "key_novelty",
            "key_redundancy")


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``pos`` above ``neg`` (ties broken by order; features are continuous)."""
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def features(att: torch.Tensor, n_kv: int) -> dict[str, torch.Tensor]:
    """``att``: ``(Hq, T, T)`` one layer's attention -> name -> ``(heads, T)`` per-token values."""
    hq, t, _ = att.shape
    idx = torch.arange(t)
    norm = torch.log(idx.float() + 2)
    ent = -(att.clamp_min(1e-12).log() * att).sum(-1) / norm
    kv = att.view(n_kv, hq // n_kv, t, t).mean(1)
    kv_ent = -(kv.clamp_min(1e-12).log() * kv).sum(-1) / norm
    z = (kv_ent - kv_ent.mean(1, keepdim=True)) / kv_ent.std(1, keepdim=True)
    return {"received": att.sum(1) / (t - idx).float(), "query_entropy": ent, "kv_query_entropy": kv_ent,
            "layer_query_entropy": z.mean(0, keepdim=True)}


def key_features(keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """``keys``: ``(H_kv, T, D)`` one layer's cached keys -> name -> ``(H_kv, T)`` per-token values."""
    unit = torch.nn.functional.normalize(keys, dim=-1)
    mean = torch.nn.functional.normalize(keys.mean(1, keepdim=True), dim=-1)
    sim = unit @ unit.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(-1.0)
    return {"key_norm": keys.norm(dim=-1), "key_novelty": 1 - (unit * mean).sum(-1),
            "key_redundancy": sim.amax(-1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=6100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    model.set_attn_implementation("eager")
    n_kv = model.config.num_key_value_heads
    scores: dict[tuple[str, int, int], list[float]] = {}
    for name in args.tasks.split(","):
        for s in get_task(name).samples(args.samples, seed=args.seed, length=args.length, tokenizer=tok):
            ids = tok(s.prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model(ids, output_attentions=True, use_cache=True)
            t = ids.shape[1]
            needle = np.zeros(t, bool)
            for n in s.meta["needles"]:
                needle[n["token_index"]:n["token_end"]] = True
            hay = np.zeros(t, bool)
            lo, hi = s.meta["haystack_token_span"]
            hay[lo:hi] = True
            pos, neg = needle & hay, ~needle & hay
            for layer, att in enumerate(out.attentions):
                feats = features(att[0].float(), n_kv)
                feats.update(key_features(out.past_key_values.layers[layer].keys[0].float()))
                for feat, values in feats.items():
                    for head, row in enumerate(values.numpy()):
                        scores.setdefault((feat, layer, head), []).append(auroc(row[pos], row[neg]))
    print("| feature | heads | AUROC >= 0.75 (either sign) | best head (layer, head): AUROC ± std over samples |")
    print("|---|---|---|---|")
    for feat in FEATURES:
        keys = [k for k in scores if k[0] == feat]
        mean = {k: float(np.mean(scores[k])) for k in keys}
        strength = {k: max(m, 1 - m) for k, m in mean.items()}
        best = max(keys, key=strength.get)
        print(f"| {feat} | {len(keys)} | {sum(v >= 0.75 for v in strength.values())} | ({best[1]}, {best[2]}): "
              f"{mean[best]:.3f} ± {np.std(scores[best]):.3f} |")


if __name__ == "__main__":
    main()
