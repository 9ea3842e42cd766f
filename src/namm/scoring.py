"""A graded metric: the teacher-forced log-likelihood of a sample's gold answer under a policy's cache.

Exact match scores a near miss and a lost needle both 0; the gold answer's log-likelihood after the prompt
(and the memory steps the policy took over it) separates them, and costs one forward pass over the answer
instead of a decoding loop.

>>> score = answer_nll(model, tok, prompt, " 42817", namm.policies.SnapKV(budget=0.25))
>>> score.logprob, score.tokens, score.mean_nll

The answer runs through the cache as a probe (:meth:`namm.cache.MemoryCache.probe`): it sees the cache as the
prompt's memory steps left it, and no memory step runs inside it. For a policy that never evicts (``Full``)
the score depends on the sample only, so callers comparing policies compute it once per sample.
"""

from __future__ import annotations

from namm.engine import AnswerScore, generate
from namm.policies.base import Policy
from namm.tasks import Sample, Task

__all__ = ["AnswerScore", "answer_nll", "gold_answer", "sample_answer_nll"]


def gold_answer(sample: Sample, task: Task | None = None) -> str:
    """The continuation of ``sample.prompt`` a perfect model would write.

    Tasks that require every reference (RULER's ``string_match_all``: several needles' values) join all of them
    with ``", "``; the others take the first reference. A space separates it from a prompt that does not end in
    whitespace (prompts end with the answer prefix, e.g. ``"... The pass key is"``).
    """
    every = task is not None and getattr(task, "metric_name", "") == "string_match_all"
    text = ", ".join(sample.answers) if every else sample.answers[0]
    return text if sample.prompt[-1:].isspace() or text[:1].isspace() else " " + text


def answer_nll(
    model, tokenizer, prompt: str, answer: str, policy: Policy, *, delay: int = 512, chunk_size: int | None = None,
    question: str | None = None, max_answer_tokens: int | None = None,
) -> AnswerScore:
    """Teacher-forced log-likelihood of ``answer`` after ``prompt`` under ``policy``'s cache (no decoding).

    Args:
        model, tokenizer: the model and its tokenizer.
        prompt: the prompt (the context, with ``question``).
        answer: the gold continuation, e.g. :func:`gold_answer` of a sample.
        policy: the eviction policy; its memory steps run over the prompt exactly as in :func:`namm.generate`.
        delay, chunk_size: the memory-step cadence and prefill chunks (as :func:`namm.generate`).
        question: question-agnostic mode: ``prompt`` is the context, compressed before ``question`` is appended.
        max_answer_tokens: score only the answer's first tokens.

    Returns:
        An :class:`~namm.engine.AnswerScore`: ``logprob`` (sum, nats), ``tokens``, ``mean_nll`` (per token).
    """
    out = generate(model, tokenizer, prompt, policy, max_new_tokens=0, delay=delay, chunk_size=chunk_size,
                   question=question, answer=answer, max_answer_tokens=max_answer_tokens)
    return out.answer


def sample_answer_nll(
    model, tokenizer, task: Task, sample: Sample, policy: Policy, *, delay: int = 512, chunk_size: int | None = None,
    question_agnostic: bool = False,
) -> AnswerScore:
    """:func:`answer_nll` of a task sample's :func:`gold_answer`, at most ``sample.max_new_tokens`` tokens of it."""
    prompt, question = (sample.context, sample.question) if question_agnostic else (sample.prompt, None)
    return answer_nll(model, tokenizer, prompt, gold_answer(sample, task), policy, delay=delay, chunk_size=chunk_size,
                      question=question, max_answer_tokens=sample.max_new_tokens)
