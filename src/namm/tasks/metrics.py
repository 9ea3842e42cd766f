"""Answer metrics: LongBench's per-task metrics, RULER's string matches and InfiniteBench's exact-contains.

Every metric takes ``(prediction, ground_truth, *, all_classes=None)`` and returns a float in [0, 1]; a task
scores a prediction as the maximum over its reference answers. The LongBench functions restate THUDM/LongBench
``metrics.py`` with these documented differences:

* ``rouge_score``: LongBench calls the ``rouge`` package (``Rouge().get_scores(...)["rouge-l"]["f"]``). We use
  Google's ``rouge-score`` package instead: ROUGE-L F-measure (sentence-level LCS) with its default tokenizer
  (lowercase, runs of ``[a-z0-9]`` as tokens, no stemming). Values are close to, not identical with, the
  ``rouge`` package's. An empty prediction or reference scores 0, as LongBench's ``except: return 0``.
* ``rouge_zh_score``: jieba-segmented, space-joined text as LongBench, then ROUGE-L F over the whitespace tokens
  (``rouge-score``'s default tokenizer would drop every Chinese character).
* ``code_sim_score``: ``rapidfuzz.fuzz.ratio`` instead of ``fuzzywuzzy.fuzz.ratio`` (same Indel similarity,
  not rounded to an integer percentage).
* ``classification_score``: LongBench removes matched class names that are proper substrings of the gold label
  while iterating over the same list (which can skip an element); we filter the list in one pass. LongBench's
  ``difflib`` fallback is dead code there (``em_match_list != 0`` is always true) and is not reproduced.
* ``retrieval_score`` / ``retrieval_zh_score``: if the gold answer holds no ``Paragraph N`` / ``段落N`` (LongBench
  would raise), its first integer is used; with no integer at all the score is 0.

jieba is imported lazily (its dictionary load costs about a second) and its logging is silenced.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from namm.errors import NammError

_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_INT = re.compile(r"\d+")

Metric = Callable[..., float]


@lru_cache(maxsize=1)
def _jieba():
    import jieba  # noqa: PLC0415 - lazy: loading its dictionary takes about a second

    jieba.setLogLevel(logging.WARNING)
    logging.getLogger("jieba").setLevel(logging.WARNING)
    return jieba


def jieba_cut(text: str) -> list[str]:
    """Segment Chinese text with jieba (precise mode, as LongBench)."""
    return list(_jieba().cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """LongBench/SQuAD normalisation: lowercase, drop ASCII punctuation, articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """LongBench Chinese normalisation: lowercase, drop ASCII and Chinese punctuation and all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def first_line(prediction: str) -> str:
    """LongBench's few-shot post-processing (trec, triviaqa, samsum, lsht): first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Token F1 after :func:`normalize_answer` (narrativeqa, qasper, multifieldqa_en, hotpotqa, ...)."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Token F1 over jieba words, each normalised by :func:`normalize_zh_answer`, empty ones dropped."""

    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in jieba_cut(text)) if t]

    return f1_tokens(tokens(prediction), tokens(ground_truth))


class _WhitespaceTokenizer:
    """Tokenizer for ``rouge_score`` that keeps every whitespace-separated token (for jieba-joined text)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=2)
def _rouge_scorer(whitespace: bool):
    from rouge_score import rouge_scorer  # noqa: PLC0415

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer() if whitespace else None)


def _rouge_l(prediction: str, ground_truth: str, whitespace: bool) -> float:
    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    return float(_rouge_scorer(whitespace).score(ground_truth, prediction)["rougeL"].fmeasure)


def rouge_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F-measure (``rouge-score`` package, default tokenizer; see the module docstring)."""
    return _rouge_l(prediction, ground_truth, whitespace=False)


def rouge_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F-measure over jieba words (dureader, vcsum)."""
    return _rouge_l(" ".join(jieba_cut(prediction)), " ".join(jieba_cut(ground_truth)), whitespace=True)


def classification_score(prediction: str, ground_truth: str, *, all_classes: Iterable[str] | None = None,
                         **_: object) -> float:
    """LongBench classification (trec, lsht): 1/len(matches) if the gold label is among the class names found.

    The matches are the class names that occur in the prediction, minus those that are proper substrings of the
    gold label (so a gold "Other location" is not penalised for also containing "location").
    """
    if all_classes is None:
        raise NammError("classification_score needs all_classes (the task's label set).")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_fraction(prediction: str, target: str) -> float:
    numbers = _INT.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    """passage_count: fraction of the integers in the prediction equal to the gold count."""
    return _number_fraction(prediction, str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth) or _INT.findall(ground_truth)
    return _number_fraction(prediction, found[0]) if found else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """passage_retrieval_en: the gold "Paragraph N"; score = fraction of the prediction's integers equal to N."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """passage_retrieval_zh: as :func:`retrieval_score` with the gold written "段落N"."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """lcc, repobench-p: ``fuzz.ratio / 100`` between the gold line and the prediction's first code line.

    The first code line is the first line (after leading newlines) that contains no backtick, no ``#`` and no
    ``//``; if every line has one, the prediction counts as empty.
    """
    from rapidfuzz import fuzz  # noqa: PLC0415

    line = next((s for s in prediction.lstrip("\n").split("\n") if not any(m in s for m in ("`", "#", "//"))), "")
    return float(fuzz.ratio(line, ground_truth)) / 100.0


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: fraction of the references found (case-insensitively) in the prediction."""
    if not references:
        return 0.0
    low = prediction.lower()
    return sum(r.lower() in low for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER: 1 if any reference occurs (case-insensitively) in the prediction, else 0."""
    low = prediction.lower()
    return float(any(r.lower() in low for r in references))


def contains_score(prediction: str, ground_truth: str, **_: object) -> float:
    """InfiniteBench-style exact containment (case-sensitive): 1 if the answer string occurs in the prediction."""
    return float(bool(ground_truth) and ground_truth in prediction)


LONGBENCH_METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}
"""LongBench metric name -> per-answer metric ``(prediction, ground_truth, all_classes=...) -> float``."""
