"""Write a NAMM checkpoint from a recipe and a fitted linear head (``benchmarks/fit_warm_start.py``'s output).

The checkpoint is the recipe's NAMM (its configuration and cadence) with the BAM's qkv/out weights at zero and the
fitted ``head_weight`` (or one feature alone, ``--only reconstruction``: the rule without the fit, for the
ablation); ``fit.json`` beside it says where it came from.

Usage: ``python benchmarks/fitted_checkpoint.py --recipe src/namm/recipes/smollm2-recon.yaml
--fit runs/warm-start-recon/warm_start.json --out src/namm/checkpoints/smollm2-135m``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from namm.atomic import atomic_fill_dir, atomic_write_json
from namm.evolution.lm import recipe_namm
from namm.evolution.recipe import load_recipe
from namm.memory import flatten, unflatten


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--fit", help="warm_start.json of fit_warm_start.py")
    parser.add_argument("--only", help="instead of a fit: weight 1 on this one feature (e.g. reconstruction)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if (args.fit is None) == (args.only is None):
        parser.error("give exactly one of --fit and --only")
    recipe = load_recipe(args.recipe)
    policy = recipe_namm(recipe)
    named = unflatten(torch.zeros(policy.n_params), policy.config)
    if args.fit:
        fit = json.loads(Path(args.fit).read_text())
        weights = torch.tensor(fit["head_weight"], dtype=torch.float32)
        if weights.shape != named["head_weight"].shape[:1]:
            raise SystemExit(f"{args.fit}: {weights.numel()} head weights, the recipe's NAMM has "
                             f"{named['head_weight'].shape[0]} features")
        named["head_weight"][:, 0] = weights
        provenance = {"recipe": args.recipe, "fit": args.fit, "features": fit["features"],
                      "needle_recall_at_budget": fit.get("needle_recall_at_budget")}
    else:
        from fit_warm_start import feature_names  # noqa: PLC0415 - a sibling script

        names = feature_names(policy.config)
        named["head_weight"][names.index(args.only), 0] = 1.0
        provenance = {"recipe": args.recipe, "only": args.only, "features": names}
    policy.set_params(flatten(named, policy.config))

    def fill(folder: Path) -> None:
        policy.save_pretrained(folder)
        atomic_write_json(folder / "fit.json", provenance)

    atomic_fill_dir(args.out, fill)
    print(f"wrote {args.out}: {policy.describe()}")


if __name__ == "__main__":
    main()
