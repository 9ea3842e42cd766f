"""Population mode: one prompt run once per population member, its shared prefix computed once.

A NAMM population (``NAMM.set_population``, a ``(P, n)`` matrix) scores batch row ``b`` with member ``b``. Run
on ``P`` copies of one prompt, every row is identical until the first memory step, where the members start to
keep different tokens. :func:`generate_copies` therefore prefills that prefix on one row, with the cache's
memory steps held back (:meth:`namm.cache.MemoryCache.hold_steps`), then copies the cache to ``P`` rows
(``batch_repeat_interleave``) and runs the held steps, every row with its own member; the rest of the prompt
and the decoding run on the ``P`` rows. The result equals ``P`` separate runs (tests/test_population.py).

The fan-out is a :class:`~namm.engine.PrefillHook` of :func:`namm.generate`: the engine and the cache know
nothing of populations.
"""

from __future__ import annotations

import torch

from namm.cache import MemoryCache
from namm.engine import GenerationResult, generate
from namm.errors import NammError


class SharedPrefix:
    """A :class:`~namm.engine.PrefillHook`: prefill the prefix before the first memory step on one row, then
    fan the cache out to ``copies`` rows and run the held memory steps."""

    def __init__(self, copies: int):
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
            raise NammError(f"copies must be a positive number of rows, got {copies!r}.")
        self.copies = copies
        self.shared = 0
        self.fanned_out = False

    def begin(self, cache: MemoryCache, input_ids: torch.Tensor) -> None:
        if input_ids.shape[0] != 1:
            raise NammError("Copies of a prompt need a single prompt (and no question).")
        self.shared = min(input_ids.shape[1], cache.delay)  # identical for every row until the first step
        self.fanned_out = False
        # a probing policy's steps are the engine's to run (after its probe, on every row): leave them held
        self.engine_runs_steps = cache.policy.request.probe
        cache.hold_steps()

    def after_forward(self, cache: MemoryCache, end: int) -> None:
        if self.fanned_out or end < self.shared:
            return
        self.fanned_out = True
        cache.batch_repeat_interleave(self.copies)
        if not self.engine_runs_steps:
            cache.hold_steps(False)
            cache.run_due_steps()


def generate_copies(model, tokenizer, prompt: str | torch.Tensor, policy, copies: int, **options) -> GenerationResult:
    """:func:`namm.generate` on ``copies`` identical rows of one prompt (e.g. one per member of a NAMM population,
    ``NAMM.set_population``), the prefix before the first memory step computed once and copied to every row.

    ``options`` are :func:`namm.generate`'s (no ``question``). With ``copies > 1`` the result's ``text``,
    ``token_ids`` and ``answer`` are per row; with ``copies=1`` it is a plain run.
    """
    if "question" in options or "prefill_hook" in options:
        raise NammError("Copies of a prompt need a single prompt (and no question).")
    hook = SharedPrefix(copies)
    if copies == 1:
        return generate(model, tokenizer, prompt, policy, **options)
    return generate(model, tokenizer, prompt, policy, prefill_hook=hook, **options)


__all__ = ["SharedPrefix", "generate_copies"]
