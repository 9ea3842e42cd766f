"""LongBench tasks: templates, metric table, MiniLongBench / raw / hub loaders, subsets and middle truncation."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from namm.errors import NammError
from namm.tasks import LongBenchTask, Sample, get_task, list_tasks, truncate_middle
from namm.tasks import longbench as lb

# NAMM spec section 7.2: task -> (metric, max new tokens).
SPEC_TABLE = {
    "narrativeqa": ("qa_f1", 128), "qasper": ("qa_f1", 128), "multifieldqa_en": ("qa_f1", 64),
    "multifieldqa_zh": ("qa_f1_zh", 64), "hotpotqa": ("qa_f1", 32), "2wikimqa": ("qa_f1", 32),
    "musique": ("qa_f1", 32), "dureader": ("rouge_zh", 128), "gov_report": ("rouge", 512),
    "qmsum": ("rouge", 512), "multi_news": ("rouge", 512), "vcsum": ("rouge_zh", 512),
    "trec": ("classification", 64), "triviaqa": ("qa_f1", 32), "samsum": ("rouge", 128),
    "lsht": ("classification", 64), "passage_count": ("count", 32), "passage_retrieval_en": ("retrieval", 32),
    "passage_retrieval_zh": ("retrieval_zh", 32), "lcc": ("code_sim", 64), "repobench-p": ("code_sim", 64),
}
MINI = Path(lb.DEFAULT_DATA_DIR)
MINI_TASKS = sorted(p.stem for p in MINI.glob("*.jsonl"))


class CharTokenizer:
    """A hand-made character tokenizer with a BOS (id 0), shaped like a Hugging Face tokenizer."""

    model_max_length = 10**9
    all_special_ids = [0]

    def __call__(self, text, add_special_tokens=True, verbose=False, **_):
        ids = [ord(c) for c in text]
        return {"input_ids": [0, *ids] if add_special_tokens else ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


@pytest.fixture(autouse=True)
def _default_data_dir(monkeypatch):
    monkeypatch.delenv(lb.DATA_DIR_ENV, raising=False)


def _raw_row(context: str, question: str, answers: list[str], all_classes=None) -> dict:
    return {"input": question, "context": context, "answers": answers, "length": 5, "dataset": "x",
            "language": "en", "all_classes": all_classes, "_id": "abc"}


def test_all_21_tasks_are_registered_with_the_spec_metric_and_budget():
    names = list_tasks()
    assert set(SPEC_TABLE) <= set(names)
    for name, (metric, max_new) in SPEC_TABLE.items():
        task = get_task(name)
        assert isinstance(task, LongBenchTask)
        assert (task.metric_name, task.max_new_tokens) == (metric, max_new), name
        assert lb.TEMPLATES[name].count("{context}") == 1
    assert sum(len(v) for v in lb.CATEGORIES.values()) == 21
    assert get_task("lb/passage_retrieval_en").name == "passage_retrieval_en"


def test_minilongbench_files_present():
    assert len(MINI_TASKS) >= 10


@pytest.mark.parametrize("name", MINI_TASKS)
def test_minilongbench_task_loads_and_splits(name):
    task = get_task(name)
    samples = task.load()
    assert samples and len({s.id for s in samples}) == len(samples)
    for s in samples:
        assert s.task == name and s.answers and all(isinstance(a, str) for a in s.answers)
        assert s.max_new_tokens == SPEC_TABLE[name][1]
        # Every MiniLongBench task here, English and Chinese, is split by its template.
        assert s.question is not None and s.context + s.question == s.prompt
        assert s.question.strip()
        if "{input}" in lb.TEMPLATES[s.meta["template"]] and name != "repobench-p":
            assert len(s.question) > len(lb.TEMPLATES[s.meta["template"]].split("{input}")[1])
    if name in ("trec", "lsht"):
        assert samples[0].meta["all_classes"]
    # The reference answer scores full marks on every sample (code_sim compares the first line only).
    for s in samples:
        assert task.score(s.answers[0], s) == pytest.approx(1.0), (name, s.id)


def test_minilongbench_question_parts():
    trec = get_task("trec").load()[0]
    assert trec.question.startswith("\nQuestion: ") and trec.question.endswith("\nType:")
    assert trec.question.count("Question:") == 1
    qasper = get_task("qasper").load()[0]  # MiniLongBench built qasper with the multi-document QA template
    assert qasper.meta["template"] in ("hotpotqa", "2wikimqa", "musique")
    assert qasper.question.startswith("\n\nAnswer the question based on the given passages.")
    assert qasper.question.endswith("\nAnswer:")
    retrieval = get_task("passage_retrieval_en").load()[0]
    assert retrieval.question.startswith("\n\nThe following is an abstract.\n\n")
    assert retrieval.context.rstrip().endswith(".")


def test_prefilled_prompt_without_a_matching_template_has_no_split(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps({"id": "7", "prompt": "Some unrelated prompt. Answer:",
                                                         "answers": ["x"], "all_classes": None}) + "\n")
    s = get_task("hotpotqa", data_dir=tmp_path).load()[0]
    assert s.id == "7" and s.context is None and s.question is None


def test_raw_longbench_rows_fill_the_template(tmp_path):
    rows = [_raw_row("Passage 1:\nParis is in France.", "Where is Paris?", ["France"]),
            _raw_row("Passage 1:\nRome is in Italy.", "Where is Rome?", ["Italy"])]
    (tmp_path / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task("hotpotqa", data_dir=tmp_path)
    samples = task.load()
    assert [s.id for s in samples] == ["0", "1"]
    s = samples[0]
    assert s.prompt == lb.TEMPLATES["hotpotqa"].format(context=rows[0]["context"], input=rows[0]["input"])
    assert s.context.endswith("Paris is in France.")
    assert s.question == ("\n\nAnswer the question based on the given passages. Only give me the answer and do not "
                          "output any other words.\n\nQuestion: Where is Paris?\nAnswer:")
    assert s.meta["_id"] == "abc" and s.meta["source"] == "raw"
    assert task.score(" France.", s) == 1.0
    # A raw prompt re-split as if pre-filled gives the same parts.
    assert lb.split_prompt("hotpotqa", s.prompt)[:2] == (s.context, s.question)


def test_raw_fewshot_rows_split_exactly_and_first_line_rule(tmp_path):
    context = "Question: When was X born ?\nType: Date\nQuestion: Why is the sky blue ?\nType: Reason"
    row = _raw_row(context, "Question: What day is it ?\nType:", ["Date"], ["Date", "Reason"])
    (tmp_path / "trec.jsonl").write_text(json.dumps(row) + "\n")
    task = get_task("trec", data_dir=tmp_path)
    s = task.load()[0]
    assert s.question == "\nQuestion: What day is it ?\nType:"
    assert lb.split_prompt("trec", s.prompt)[:2] == (s.context, s.question)
    assert task.score("\n Date\nQuestion: Why ?\nType: Reason", s) == 1.0  # only the first line counts
    assert task.score("Date or Reason", s) == 0.5


def test_env_var_and_option_select_the_data_dir(tmp_path, monkeypatch):
    row = {"id": "0", "prompt": lb.TEMPLATES["lcc"].format(context="x = 1\n"), "answers": ["y = 2"],
           "all_classes": None}
    (tmp_path / "lcc.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv(lb.DATA_DIR_ENV, str(tmp_path))
    s = get_task("lcc").load()[0]
    assert s.question == "Next line of code:\n" and s.context.endswith("x = 1\n")
    assert get_task("lcc").score("```python\n# next\ny = 2\n", s) == 1.0


def test_missing_directory_and_task_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NammError, match=re.escape(str(missing))) as err:
        get_task("qasper", data_dir=missing).load()
    assert "prompt" in str(err.value) and "context" in str(err.value)
    with pytest.raises(NammError, match=re.escape(str(tmp_path / "qasper.jsonl"))):
        get_task("qasper", data_dir=tmp_path).load()


def test_malformed_rows(tmp_path):
    (tmp_path / "qasper.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(NammError, match="expected the fields"):
        get_task("qasper", data_dir=tmp_path).load()
    (tmp_path / "qasper.jsonl").write_text("not json\n")
    with pytest.raises(NammError, match="not valid JSON"):
        get_task("qasper", data_dir=tmp_path).load()


def test_seeded_subsets_without_replacement():
    task = get_task("passage_retrieval_en")
    total = len(task.load())
    a = task.samples(6, seed=3)
    assert len({s.id for s in a}) == 6
    assert [s.id for s in a] == [s.id for s in task.samples(6, seed=3)]
    assert [s.id for s in a] != [s.id for s in task.samples(6, seed=4)]
    b = task.samples(6, seed=3, offset=6)
    assert not {s.id for s in a} & {s.id for s in b}
    assert len(task.samples(1000, seed=3)) == total
    with pytest.raises(NammError, match="synthetic"):
        task.samples(1, depth=0.5)
    with pytest.raises(NammError, match="tokenizer"):
        task.samples(1, length=100)


def test_truncate_middle_keeps_both_ends():
    tok = CharTokenizer()
    prompt = "".join(chr(ord("a") + i % 26) for i in range(100))
    assert truncate_middle(prompt, tok, 100) == prompt
    assert truncate_middle(prompt, tok, 10) == prompt[:5] + prompt[-5:]
    assert truncate_middle(prompt, tok, 11) == prompt[:5] + prompt[-5:]
    with pytest.raises(NammError):
        truncate_middle(prompt, tok, 1)


def test_samples_truncate_to_the_limit_and_keep_the_question():
    tok = CharTokenizer()
    task = get_task("qasper")
    full = {s.id: s for s in task.load()}
    for s in task.samples(3, seed=0, length=1001, tokenizer=tok):
        original = full[s.id]
        assert s.meta["truncated"] and s.meta["original_length"] == len(original.prompt) + 1
        assert s.prompt == original.prompt[:500] + original.prompt[-500:]
        assert s.meta["length"] == 1001  # 1000 characters plus the BOS
        assert s.question == original.question and s.context + s.question == s.prompt
    default = get_task("qasper", length=1001).samples(1, seed=0, tokenizer=tok)[0]
    assert default.meta["truncated"] and default.meta["length"] == 1001
    short = task.samples(1, seed=0, length=10**6, tokenizer=tok)[0]
    assert not short.meta["truncated"] and short.prompt == full[short.id].prompt


def test_too_long_without_truncation_is_a_clear_error():
    task = get_task("qasper", truncate=False)
    with pytest.raises(NammError) as err:
        task.samples(1, seed=0, length=500, tokenizer=CharTokenizer())
    msg = str(err.value)
    sample_id = task.samples(1, seed=0)[0].id
    assert f"'{sample_id}'" in msg and "500" in msg and "truncate=True" in msg
    assert re.search(r"has \d+ tokens", msg)


def test_sample_checks_and_mean_score():
    with pytest.raises(NammError, match="context \\+ question"):
        Sample("0", "qasper", "ab", ["a"], 8, context="a", question="c")
    with pytest.raises(NammError, match="both"):
        Sample("0", "qasper", "ab", ["a"], 8, context="a")
    task = get_task("passage_retrieval_en")
    samples = task.load()[:2]
    assert task.mean_score([s.answers[0] for s in samples], samples) == 1.0
    assert task.mean_score([samples[0].answers[0], "Paragraph 99"], samples) == 0.5
    with pytest.raises(NammError, match="predictions"):
        task.mean_score(["x"], samples)
    assert task.prompt_budget(4096) == 4096 - 32


def test_bad_task_options():
    with pytest.raises(NammError, match="Valid tasks:.*qasper"):
        get_task("qasperr")
    with pytest.raises(NammError, match="accepted options: data_dir, source, truncate, length"):
        get_task("qasper", depth=0.5)
    with pytest.raises(NammError, match="source"):
        get_task("qasper", source="internet")


def test_hub_loader_is_thin_and_explains_failures(monkeypatch):
    calls = {}

    def load_dataset(repo, **kwargs):
        calls.update(repo=repo, **kwargs)
        return [_raw_row("Some story.", "Who?", ["Bob"])]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    s = get_task("narrativeqa", source="hub").load()[0]
    assert calls["repo"] == "THUDM/LongBench" and calls["revision"] == "refs/convert/parquet"
    assert calls["split"] == "test"
    assert s.id == "0" and s.meta["source"] == "hub" and s.prompt.endswith("Question: Who?\n\nAnswer:")

    def offline(repo, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(NammError, match="no network") as err:
        get_task("narrativeqa", source="hub").load()
    assert "data_dir" in str(err.value) and lb.DATA_DIR_ENV in str(err.value)


@pytest.mark.integration
def test_truncation_with_the_bundled_tokenizer():
    from transformers import AutoTokenizer

    from namm.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    task = get_task("2wikimqa")
    for s in task.samples(4, seed=0, length=1024, tokenizer=tok):
        assert s.meta["length"] == len(tok(s.prompt)["input_ids"])
        assert s.meta["length"] <= 1024 + 2
        if s.meta["truncated"]:
            assert s.question is not None and s.question.endswith("\nAnswer:")
