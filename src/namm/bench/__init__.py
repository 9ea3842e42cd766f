"""``namm bench``: a fixed suite of tasks x lengths x seeds, every policy x budget, one JSON line per sample,
and the leaderboard (bootstrap intervals, a paired comparison, a Pareto plot).

>>> suite = load_suite("quick")                      # a shipped suite, or a path to a YAML file
>>> run_suite(suite, Path("runs/bench-quick"), model, tokenizer)
>>> render(suite, Path("runs/bench-quick"), page=Path("docs/leaderboard.md"))
"""

from namm.bench.leaderboard import render, summarise
from namm.bench.run import make_groups, run_suite
from namm.bench.suite import Cell, Suite, TaskSpec, load_suite

__all__ = ["Cell", "Suite", "TaskSpec", "load_suite", "make_groups", "render", "run_suite",
           "summarise"]
