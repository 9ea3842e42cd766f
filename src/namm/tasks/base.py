"""Task interface: samples, scoring, token counting and the task registry.

A :class:`Task` makes :class:`Sample` prompts (raw text, no chat template, ending with the answer prefix) and
scores a model's prediction against a sample's reference answers. :func:`get_task` builds a task by name;
:func:`list_tasks` lists the names (the synthetic tasks of :mod:`namm.tasks.synthetic`, then the 21 LongBench
tasks of :mod:`namm.tasks.longbench`).

Token lengths are measured the way a model sees the prompt: ``len(tokenizer(prompt)["input_ids"])``, special
tokens (e.g. Gemma's BOS) included. Without a tokenizer, lengths fall back to an approximate count (words and
punctuation marks, regex ``\\w+|[^\\w\\s]``), which keeps tokenizer-free use deterministic.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from namm.errors import NammError

_APPROX_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class Sample:
    """One prompt with its reference answers.

    Attributes:
        id: sample identifier, unique within its task (LongBench: the row index in the test split, as a string).
        task: task name.
        prompt: the full prompt, question included, ending with the answer prefix.
        answers: reference answers; a prediction scores the maximum over them (RULER tasks: all must appear).
        max_new_tokens: generation budget.
        context: prompt prefix up to the end of the long context (for question-agnostic prefill), or None.
        question: the rest of the prompt after ``context``, or None. ``context + question == prompt`` whenever
            both are set.
        meta: free-form details (e.g. ``all_classes``, needle spans and token indices, depth, seed, lengths).
    """

    id: str
    task: str
    prompt: str
    answers: list[str]
    max_new_tokens: int
    context: str | None = None
    question: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.context is None) != (self.question is None):
            raise NammError(f"Sample {self.id!r} of {self.task!r}: set both context and question, or neither.")
        if self.context is not None and self.context + self.question != self.prompt:
            raise NammError(f"Sample {self.id!r} of {self.task!r}: context + question must equal the prompt.")


class Task(ABC):
    """A benchmark task: makes samples and scores predictions.

    Attributes:
        name: registry name.
        metric_name: name of the metric (e.g. ``qa_f1``, ``string_match_all``).
        max_new_tokens: default generation budget of the task's samples.
    """

    name: str
    metric_name: str
    max_new_tokens: int

    @abstractmethod
    def samples(
        self,
        n: int,
        *,
        seed: int = 0,
        length: int | None = None,
        tokenizer: Any = None,
        depth: float | None = None,
        offset: int = 0,
    ) -> list[Sample]:
        """Return ``n`` samples, deterministic in ``seed``; ``offset`` skips the first ``offset`` of that order.

        Args:
            n: number of samples.
            seed: random seed.
            length: prompt length in tokens of ``tokenizer`` (synthetic tasks: target length; LongBench: limit,
                longer prompts are middle-truncated).
            tokenizer: a Hugging Face tokenizer (or any callable returning ``{"input_ids": [...]}``).
            depth: needle position in [0, 1] for synthetic tasks (0 = start of the haystack, 1 = end).
            offset: number of samples to skip (e.g. a validation split after a training split).
        """

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Score one prediction (the generated text only) against a sample, in [0, 1]."""

    def mean_score(self, predictions: Sequence[str], samples: Sequence[Sample]) -> float:
        """Mean of :meth:`score` over paired predictions and samples (LongBench reports 100 x this)."""
        if len(predictions) != len(samples):
            raise NammError(f"{len(predictions)} predictions for {len(samples)} samples of {self.name!r}.")
        if not samples:
            raise NammError(f"No samples to score for {self.name!r}.")
        return sum(self.score(p, s) for p, s in zip(predictions, samples, strict=True)) / len(samples)

    def prompt_budget(self, context_window: int) -> int:
        """Prompt tokens left in a context window after the generation budget (LongBench: ``max_len - max_gen``)."""
        return context_window - self.max_new_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric_name!r})"


def _check_n(n: int, offset: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise NammError(f"n must be a non-negative integer, got {n!r}.")
    if not isinstance(offset, int) or offset < 0:
        raise NammError(f"offset must be a non-negative integer, got {offset!r}.")


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "model_max_length") and hasattr(tokenizer, "decode")


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (special tokens added as ``tokenizer(text)`` adds them, unless told otherwise)."""
    if _is_hf_tokenizer(tokenizer):
        # verbose=False: long prompts are expected here; skip the "longer than model_max_length" warning.
        return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
    out = tokenizer(text)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Prompt length in tokens as the model sees it; approximate word/punctuation count without a tokenizer."""
    if tokenizer is None:
        return len(_APPROX_TOKEN.findall(text))
    return len(encode(tokenizer, text))


def token_indices(tokenizer: Any, text: str, char_positions: Sequence[int]) -> list[int]:
    """Index (special tokens included) of the token of ``text`` covering each character position.

    Uses the fast tokenizer's offset mapping when available, else the length of the tokenised prefix (and the
    approximate count without a tokenizer).
    """
    if tokenizer is not None and _is_hf_tokenizer(tokenizer):
        try:
            enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
        except (NotImplementedError, TypeError, ValueError):
            enc = None
        if enc is not None and "offset_mapping" in enc:
            # Added special tokens (BOS, ...) have empty spans; skip them when looking for the covering token.
            ends = [(end, i) for i, (start, end) in enumerate(enc["offset_mapping"]) if end > start]
            n = len(enc["input_ids"])
            return [next((i for end, i in ends if end > pos), n) for pos in char_positions]
    return [count_tokens(tokenizer, text[:pos]) for pos in char_positions]


# ---------------------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., Task]] = {}
_GROUP: dict[str, int] = {}
_PREFIXES = ("lb/", "longbench/")


def register(name: str, factory: Callable[..., Task], group: int = 0) -> None:
    """Register a task factory ``factory(**options) -> Task`` under ``name``.

    :func:`list_tasks` lists names by ``group`` (synthetic tasks 0, LongBench 1), then in registration order.
    """
    _REGISTRY[name] = factory
    _GROUP[name] = group


def _load_builtin() -> None:
    # Imported here, not at module import, because these modules import this one.
    import namm.tasks.longbench  # noqa: F401, PLC0415
    import namm.tasks.synthetic  # noqa: F401, PLC0415


def list_tasks() -> list[str]:
    """Names accepted by :func:`get_task`: the synthetic tasks, then the 21 LongBench tasks."""
    _load_builtin()
    order = {name: i for i, name in enumerate(_REGISTRY)}
    return sorted(_REGISTRY, key=lambda name: (_GROUP[name], order[name]))


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name (a ``lb/`` prefix, as in the reference configs, is accepted for LongBench tasks).

    Raises:
        NammError: unknown name (the message lists the valid ones) or an option the task does not take.
    """
    _load_builtin()
    key = name
    for prefix in _PREFIXES:
        if key.startswith(prefix) and key[len(prefix):] in _REGISTRY:
            key = key[len(prefix):]
    if key not in _REGISTRY:
        raise NammError(f"Unknown task {name!r}. Valid tasks: {', '.join(list_tasks())}.")
    factory = _REGISTRY[key]
    params = inspect.signature(factory).parameters
    bad = sorted(set(options) - set(params))
    if bad:
        accepted = ", ".join(p for p in params if p != "self") or "none"
        raise NammError(f"Task {key!r} does not take option(s) {', '.join(bad)}; accepted options: {accepted}.")
    return factory(**options)
