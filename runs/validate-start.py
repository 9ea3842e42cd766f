"""Validate an evolution run's *start* (its initial parameters) exactly as the run validates its mean.

One-off for session 16: runs/smollm2-replay-text validated its CMA-ES mean on seed 5300 at generations 10
and 20 (every 10, and at the stage end), but not the parameters it started from (the shipped memory, which is KVzip), so those validations had
nothing to compare with. This builds the run's own evaluator, backend and validation samples (the code of the
worktree on PYTHONPATH, the run's recipe and its stored full-cache scores) and scores the start with the same
``_score`` the run uses. Usage (after the run has stopped; it takes the run's lock):

    PYTHONPATH=../wt-12b0dd9/src .venv/bin/python runs/validate-start.py runs/smollm2-replay-text
"""

import json
import sys
from pathlib import Path

from namm.evolution.lm import checkpoint_writer, make_evaluator
from namm.evolution.recipe import load_recipe
from namm.evolution.run import _Loop, _run_lock, make_backend

run_dir = Path(sys.argv[1])
recipe = load_recipe(run_dir / "recipe.yaml")
with _run_lock(run_dir):
    evaluator = make_evaluator(recipe, run_dir)
    backend = make_backend(recipe, lambda: evaluator)
    loop = _Loop(recipe, run_dir, backend, checkpoint_writer(recipe, run_dir), progress=False, plot=False)
    start = backend.initial_params()
    fit, frac, summary, seconds = loop._score(start[None, :], loop.val_ids)
result = {"validation": float(fit[0]), "validation_cache_fraction": float(frac[0]), "validation_tasks": summary,
          "seconds": seconds, "params": "initial (the recipe's search.start)"}
(run_dir / "validation-start.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
