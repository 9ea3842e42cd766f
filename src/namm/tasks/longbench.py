"""The 21 LongBench tasks: prompt templates, generation budgets, metrics, loaders and middle truncation.

Protocol (THUDM/LongBench ``config/dataset2prompt.json``, ``dataset2maxlen.json``, ``eval.py``, ``pred.py``;
NAMM spec section 7): prompts are the task template filled with a sample's ``context`` and ``input``, fed to
the model without a chat template; greedy decoding for ``max_new_tokens`` (dataset2maxlen); for trec, triviaqa,
samsum and lsht only the first line of the prediction is scored (samsum additionally stops generating at a
newline, recorded as ``meta["stop"] = ["\\n"]``); a sample scores the maximum of the task's metric over its
answers (see :mod:`namm.tasks.metrics`). Prompts longer than the limit are middle-truncated
(:func:`truncate_middle`).

Data sources (all give ``list[Sample]`` in file / split order; ``LongBenchTask.samples`` takes seeded subsets):

* local (default): a directory (``data_dir=`` option, else ``$NAMM_LONGBENCH_DIR``, else
  ``/work/shared/data/minilongbench``) holding ``<task>.jsonl`` in either
  * MiniLongBench's pre-filled format: ``id``, ``prompt``, ``answers``, ``all_classes``. The context/question
    split is recovered by locating the template's tail (the text after ``{context}``, with ``{input}`` as a
    wildcard) at the end of the prompt; prompts built with another LongBench template (MiniLongBench's qasper
    uses the multi-document QA template) are recognised by their head. For repobench-p, whose template has no
    separator between ``{context}`` and ``{input}``, the question is the fixed tail "Next line of code:\\n".
    If nothing matches, ``context`` and ``question`` are None.
  * LongBench's raw format: ``input``, ``context``, ``answers``, ``length``, ``dataset``, ``language``,
    ``all_classes``, ``_id``; the template is filled here and the split is exact.
* hub (``source="hub"``, or ``$NAMM_LONGBENCH_SOURCE=hub``, e.g. for the command line):
  ``THUDM/LongBench`` through ``datasets``, from the hub's parquet conversion (the script-based dataset no
  longer loads in recent ``datasets``). Needs network access.

Sample ids are the row's ``id`` (MiniLongBench) or its index in the test split as a string (raw / hub, as the
reference's per-prompt score files). ChouBun (SakanaAI's Japanese benchmark) is out of scope: no data for it is
available.
"""

from __future__ import annotations

import json
import os
import random
import re
from functools import partial
from pathlib import Path
from typing import Any

from namm.errors import NammError
from namm.tasks.base import Sample, Task, _check_n, count_tokens, encode, register
from namm.tasks.metrics import LONGBENCH_METRICS, first_line

DEFAULT_DATA_DIR = "/work/shared/data/minilongbench"
DATA_DIR_ENV = "NAMM_LONGBENCH_DIR"
SOURCE_ENV = "NAMM_LONGBENCH_SOURCE"
HUB_REPO = "THUDM/LongBench"
HUB_REVISION = "refs/convert/parquet"

_ONLY_ANSWER = "Only give me the answer and do not output any other words."
_MULTI_DOC = (f"Answer the question based on the given passages. {_ONLY_ANSWER}\n\nThe following are given passages."
              f"\n{{context}}\n\nAnswer the question based on the given passages. {_ONLY_ANSWER}\n\n"
              "Question: {input}\nAnswer:")
_CONCISE = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."
_QASPER = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
           'answered based on the information in the article, write "unanswerable". If the question is a yes/no '
           'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.')

TEMPLATES: dict[str, str] = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    f"the question {_CONCISE}\n\nStory: {{context}}\n\nNow, answer the question based on the story "
                    f"{_CONCISE}\n\nQuestion: {{input}}\n\nAnswer:"),
    "qasper": (f"You are given a scientific article and a question. Answer the question {_QASPER}\n\nArticle: "
               f"{{context}}\n\n Answer the question based on the above article {_QASPER}\n\nQuestion: {{input}}"
               "\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:"),
    "multifieldqa_zh": ("阅读以下文字并用中文简短回答：\n\n{context}\n\n"
                        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："),
    "hotpotqa": _MULTI_DOC,
    "2wikimqa": _MULTI_DOC,
    "musique": _MULTI_DOC,
    "dureader": ("请基于给定的文章回答下述问题。\n\n文章：{context}\n\n"
                 "请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}"),
    "triviaqa": (f"Answer the question based on the given passage. {_ONLY_ANSWER} The following are some "
                 "examples.\n\n{context}\n\n{input}"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
               "{context}\n\n{input}"),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                      "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                      "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                      "\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                             "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
                             "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
                             'answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '),
    "passage_retrieval_zh": ("以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
                             "{context}\n\n下面是一个摘要\n\n{input}\n\n"
                             '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
"""Task -> prompt template with ``{context}`` and (most tasks) ``{input}`` slots (LongBench dataset2prompt)."""

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
"""Task -> generation budget (LongBench dataset2maxlen)."""

METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh", "gov_report": "rouge",
    "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1",
    "samsum": "rouge", "lsht": "classification", "passage_count": "count", "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh", "lcc": "code_sim", "repobench-p": "code_sim",
}
"""Task -> metric name in :data:`namm.tasks.metrics.LONGBENCH_METRICS` (LongBench eval.py dataset2metric)."""

CATEGORIES: dict[str, tuple[str, ...]] = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
"""The standard LongBench task groups."""

CHINESE = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
_INPUT_LEAD = {"trec": "Question:", "triviaqa": "Passage:", "samsum": "Dialogue:", "lsht": "新闻内容："}
"""How the ``{input}`` of the few-shot tasks begins (their examples repeat the same pattern)."""


# ---------------------------------------------------------------------------------------------------------------
# Templates: fill and split


def fill_template(task: str, context: str, input_text: str = "") -> tuple[str, str]:
    """Fill ``task``'s template; returns ``(context_part, question_part)`` whose concatenation is the prompt."""
    head, tail = TEMPLATES[task].split("{context}")
    return head + context, tail.replace("{input}", input_text)


def _tail_start(task: str, tail: str, prompt: str, lo: int) -> int | None:
    """Start of ``task``'s filled template tail at the end of ``prompt`` (rightmost match at or after ``lo``)."""
    if "{input}" in tail:
        before, after = tail.split("{input}")
        probe = before + _INPUT_LEAD.get(task, "")
        pattern = re.compile(re.escape(probe) + r".*" + re.escape(after) + r"\s*\Z", re.S)
        if not probe:  # repobench-p: nothing separates {context} from {input}; keep the fixed tail only
            probe = after
    else:
        probe = tail
        pattern = re.compile(re.escape(tail) + r"\s*\Z")
    i = prompt.rfind(probe, lo)
    while i >= lo:
        if pattern.match(prompt, i):
            return i
        i = prompt.rfind(probe, lo, i + len(probe) - 1)
    return None


def split_prompt(task: str, prompt: str) -> tuple[str, str, str] | None:
    """Split a pre-filled prompt into ``(context, question, template_task)`` (None when no template matches).

    ``template_task`` names the task whose template matched: ``task`` itself, or another task whose template
    head starts the prompt (tried in case the prompt was built with another LongBench template).
    """
    candidates = [task] + [t for t in TEMPLATES if TEMPLATES[t] != TEMPLATES[task]]
    seen: set[str] = set()
    for name in candidates:
        if TEMPLATES[name] in seen:
            continue
        seen.add(TEMPLATES[name])
        head, tail = TEMPLATES[name].split("{context}")
        if name != task and not head.strip():
            continue
        if not prompt.startswith(head):
            continue
        pos = _tail_start(name, tail, prompt, len(head))
        if pos is not None:
            return prompt[:pos], prompt[pos:], name
    return None


# ---------------------------------------------------------------------------------------------------------------
# Truncation


def truncate_middle(prompt: str, tokenizer: Any, max_tokens: int) -> str:
    """LongBench middle truncation.

    If ``prompt`` tokenised without special tokens is longer than ``max_tokens``, keep its first and last
    ``max_tokens // 2`` tokens, decode each half (skipping special tokens) and concatenate the two strings;
    otherwise return the prompt unchanged. Re-tokenising the result may differ from ``max_tokens`` by a token
    or two at the seam.
    """
    if max_tokens < 2:
        raise NammError(f"max_tokens must be at least 2 for middle truncation, got {max_tokens}.")
    ids = encode(tokenizer, prompt, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The local LongBench directory: ``explicit``, else ``$NAMM_LONGBENCH_DIR``, else the MiniLongBench copy."""
    return Path(explicit or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _answers(row: dict, where: str) -> list[str]:
    answers = row.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise NammError(f"{where}: 'answers' must be a non-empty list of strings.")
    return [str(a) for a in answers]


def sample_from_prefilled(task: str, row: dict, where: str = "row") -> Sample:
    """A :class:`Sample` from a MiniLongBench row (``id``, ``prompt``, ``answers``, ``all_classes``)."""
    prompt = str(row["prompt"])
    split = split_prompt(task, prompt)
    context, question, template = split if split else (None, None, None)
    meta = {"all_classes": row.get("all_classes"), "template": template, "source": "prefilled"}
    return Sample(id=str(row.get("id", "")), task=task, prompt=prompt, answers=_answers(row, where),
                  max_new_tokens=MAX_NEW_TOKENS[task], context=context, question=question,
                  meta=_task_meta(task, meta))


def sample_from_raw(task: str, index: int, row: dict, source: str = "raw", where: str = "row") -> Sample:
    """A :class:`Sample` from a raw LongBench row (``input``, ``context``, ``answers``, ``all_classes``, ...)."""
    context, question = fill_template(task, str(row["context"]), str(row.get("input") or ""))
    meta = {"all_classes": row.get("all_classes"), "template": task, "source": source, "_id": row.get("_id"),
            "words": row.get("length"), "language": row.get("language")}
    return Sample(id=str(index), task=task, prompt=context + question, answers=_answers(row, where),
                  max_new_tokens=MAX_NEW_TOKENS[task], context=context, question=question,
                  meta=_task_meta(task, meta))


def _task_meta(task: str, meta: dict) -> dict:
    if task == "samsum":
        meta["stop"] = ["\n"]  # LongBench adds "\n" to the EOS ids for samsum
    return meta


def load_local(task: str, directory: str | os.PathLike | None = None) -> list[Sample]:
    """All samples of ``task`` from ``<directory>/<task>.jsonl`` (pre-filled or raw rows), in file order."""
    folder = data_dir(directory)
    expected = (f"a folder of <task>.jsonl files, one JSON object per line, either MiniLongBench rows (id, prompt, "
                f"answers, all_classes) or LongBench raw rows (input, context, answers, all_classes, _id). To fix: "
                f"`export {DATA_DIR_ENV}=/path/to/that/folder`, or `export {SOURCE_ENV}=hub` to download "
                f"{HUB_REPO} from the Hugging Face hub (in Python: get_task({task!r}, data_dir=...) or "
                "source='hub')")
    origin = "" if directory else f" (from ${DATA_DIR_ENV})" if os.environ.get(DATA_DIR_ENV) else " (the default)"
    if not folder.is_dir():
        raise NammError(f"LongBench data directory {folder}{origin} does not exist; expected {expected}.")
    path = folder / f"{task}.jsonl"
    if not path.is_file():
        raise NammError(f"No LongBench file for task {task!r}: {path}{origin} is missing; expected {expected}.")
    samples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NammError(f"{where}: not valid JSON ({exc.msg}).") from exc
            if "prompt" in row:
                samples.append(sample_from_prefilled(task, row, where))
            elif "context" in row and "input" in row:
                samples.append(sample_from_raw(task, len(samples), row, "raw", where))
            else:
                raise NammError(f"{where}: expected the fields id, prompt, answers, all_classes (MiniLongBench) "
                                f"or input, context, answers, all_classes (LongBench); got {sorted(row)}.")
    return samples


def load_hub(task: str, revision: str = HUB_REVISION) -> list[Sample]:
    """All test samples of ``task`` from the Hugging Face hub (``THUDM/LongBench``, parquet conversion).

    Calls ``datasets.load_dataset("THUDM/LongBench", data_dir=task, split="test", revision=revision)``: the
    parquet branch has one folder per task (``<task>/test/*.parquet``) and no loading script.
    """
    try:
        from datasets import load_dataset  # noqa: PLC0415

        rows = load_dataset(HUB_REPO, data_dir=task, split="test", revision=revision)
    except Exception as exc:  # noqa: BLE001 - any failure (network, layout, version) gets the same advice
        raise NammError(
            f"Could not load LongBench task {task!r} from the Hugging Face hub ({HUB_REPO}, revision {revision}): "
            f"{type(exc).__name__}: {exc}. Without hub access use local files: `export {DATA_DIR_ENV}=DIR` (and "
            f"unset {SOURCE_ENV}; in Python: get_task({task!r}, data_dir=DIR)), where DIR holds {task}.jsonl as "
            "MiniLongBench rows (id, prompt, answers, all_classes) or LongBench's raw rows (from its data.zip)."
        ) from exc
    return [sample_from_raw(task, i, dict(row), "hub", f"{HUB_REPO}/{task}[{i}]") for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------------
# Task


class LongBenchTask(Task):
    """One LongBench task.

    Args:
        name: the LongBench task name (e.g. ``qasper``, ``passage_retrieval_en``).
        data_dir: local folder with ``<name>.jsonl`` (default: ``$NAMM_LONGBENCH_DIR`` or the MiniLongBench copy).
        source: ``local`` or ``hub`` (default: ``$NAMM_LONGBENCH_SOURCE``, else ``local``).
        truncate: middle-truncate prompts longer than the ``length`` given to :meth:`samples` (LongBench's
            protocol); when False such a prompt raises :class:`NammError`.
        length: default prompt-token limit for :meth:`samples` (None: no limit).
    """

    def __init__(self, name: str, data_dir: str | os.PathLike | None = None, source: str | None = None,
                 truncate: bool = True, length: int | None = None):
        if name not in TEMPLATES:
            raise NammError(f"Unknown LongBench task {name!r}. Valid: {', '.join(TEMPLATES)}.")
        where = "source" if source is not None else f"${SOURCE_ENV}"
        source = source if source is not None else os.environ.get(SOURCE_ENV) or "local"
        if source not in ("local", "hub"):
            raise NammError(f"{where} must be 'local' or 'hub', got {source!r}.")
        self.name = name
        self.metric_name = METRICS[name]
        self.max_new_tokens = MAX_NEW_TOKENS[name]
        if length is not None and (not isinstance(length, int) or length < 2):
            raise NammError(f"length must be a prompt-token limit of at least 2, got {length!r}.")
        self.data_dir, self.source, self.truncate, self.length = data_dir, source, bool(truncate), length
        self._metric = LONGBENCH_METRICS[self.metric_name]
        self._all: list[Sample] | None = None

    def load(self) -> list[Sample]:
        """All samples in file / split order (cached; no truncation)."""
        if self._all is None:
            self._all = load_hub(self.name) if self.source == "hub" else load_local(self.name, self.data_dir)
        return list(self._all)

    def samples(self, n: int, *, seed: int = 0, length: int | None = None, tokenizer: Any = None,
                depth: float | None = None, offset: int = 0) -> list[Sample]:
        """A seeded subset without replacement: the first ``n`` after ``offset`` of a seed-shuffled order.

        Fewer than ``n`` come back when the data holds fewer than ``offset + n`` samples. With ``length`` (the
        prompt-token limit, special tokens included) prompts are middle-truncated to fit, or rejected when the
        task was built with ``truncate=False``; ``tokenizer`` is then required.
        """
        _check_n(n, offset)
        if depth is not None:
            raise NammError(f"depth applies to the synthetic tasks only, not to LongBench's {self.name!r}.")
        length = self.length if length is None else length
        if length is not None and tokenizer is None:
            raise NammError(f"Fitting {self.name!r} prompts to length={length} needs the model's tokenizer.")
        pool = self.load()
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        return [self.fit(pool[i], tokenizer, length) for i in order[offset:offset + n]]

    def fit(self, sample: Sample, tokenizer: Any = None, length: int | None = None) -> Sample:
        """``sample`` with its prompt within ``length`` tokens (middle-truncated when needed) and its length."""
        if tokenizer is None:
            return sample
        n_tokens = count_tokens(tokenizer, sample.prompt)
        meta = {**sample.meta, "length": n_tokens, "truncated": False}
        if length is None or n_tokens <= length:
            return Sample(sample.id, sample.task, sample.prompt, sample.answers, sample.max_new_tokens,
                          sample.context, sample.question, meta)
        special = count_tokens(tokenizer, "")  # e.g. a BOS the tokenizer adds
        limit = length - special
        if not self.truncate:
            raise NammError(
                f"LongBench sample {sample.id!r} of {self.name!r} has {n_tokens} tokens, more than the limit of "
                f"{length}. Enable LongBench's middle truncation with get_task({self.name!r}, truncate=True) "
                "(the default) or pass a larger length."
            )
        prompt = truncate_middle(sample.prompt, tokenizer, limit)
        context = question = None
        if sample.question is not None and prompt.endswith(sample.question) and len(prompt) > len(sample.question):
            context, question = prompt[: len(prompt) - len(sample.question)], sample.question
        meta.update(truncated=True, original_length=n_tokens, length=count_tokens(tokenizer, prompt))
        return Sample(sample.id, sample.task, prompt, sample.answers, sample.max_new_tokens, context, question, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        if self.name in FIRST_LINE_TASKS:
            prediction = first_line(prediction)
        all_classes = sample.meta.get("all_classes")
        return max(self._metric(prediction, answer, all_classes=all_classes) for answer in sample.answers)


for _name in TEMPLATES:
    register(_name, partial(LongBenchTask, _name), group=1)
