"""Training NAMMs by evolution: CMA-ES (pycma), recipes, evaluators, backends and the resumable loop.

Typical use::

    from namm.evolution import evolve, load_recipe
    evolve(load_recipe("recipe.yaml"), "runs/exp1", resume=False, evaluator_factory=make_evaluator,
           save_checkpoint=write_checkpoint)

``make_evaluator`` builds an :class:`Evaluator` (a model replica scoring NAMM parameters on task samples);
it must be picklable for the Ray backend. ``write_checkpoint(params, directory)`` fills a checkpoint
directory (for a NAMM: :func:`namm.evolution.lm.checkpoint_writer`).
"""

from namm.evolution.backends import LocalBackend, RayBackend
from namm.evolution.evaluator import (
    EvalResult,
    Evaluator,
    FullScoreCache,
    fitness,
    mean_cache_fraction,
    select_samples,
    validation_samples,
)
from namm.evolution.optimizer import CMAES
from namm.evolution.plot import plot_run, read_log
from namm.evolution.recipe import RayConfig, Recipe, Stage, TaskSpec, ValidationConfig, load_recipe
from namm.evolution.run import EvolveResult, evolve, make_backend

__all__ = [
    "CMAES",
    "EvalResult",
    "Evaluator",
    "EvolveResult",
    "FullScoreCache",
    "LocalBackend",
    "RayBackend",
    "RayConfig",
    "Recipe",
    "Stage",
    "TaskSpec",
    "ValidationConfig",
    "evolve",
    "fitness",
    "load_recipe",
    "make_backend",
    "mean_cache_fraction",
    "plot_run",
    "read_log",
    "select_samples",
    "validation_samples",
]
