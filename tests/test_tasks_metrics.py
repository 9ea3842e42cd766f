"""LongBench, RULER and InfiniteBench metrics on hand-made cases with known reference values."""

from __future__ import annotations

import pytest

from namm.errors import NammError
from namm.tasks import metrics as m
from namm.tasks.metrics import (
    classification_score,
    code_sim_score,
    contains_score,
    count_score,
    f1_tokens,
    first_line,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    string_match_all,
    string_match_part,
)


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a pear.") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_qa_f1_exact_after_normalisation():
    assert qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0


def test_qa_f1_partial_overlap_exact_value():
    # "tower in paris" vs "eiffel tower": 1 shared token, P = 1/3, R = 1/2, F1 = 0.4.
    assert qa_f1_score("the tower in Paris", "Eiffel Tower") == pytest.approx(0.4)
    # Repeated tokens count with multiplicity: P = 2/3, R = 1, F1 = 0.8.
    assert qa_f1_score("yes yes no", "yes yes") == pytest.approx(0.8)


def test_qa_f1_no_overlap_and_empty():
    assert qa_f1_score("Berlin", "Paris") == 0.0
    assert qa_f1_score("", "Paris") == 0.0
    assert f1_tokens([], []) == 0.0


def test_chinese_normalisation_and_f1():
    assert normalize_zh_answer("增长了 25.89%。") == "增长了2589"
    assert qa_f1_zh_score("增长了25.89%", "增长了25.89%。") == 1.0
    assert qa_f1_zh_score("北京", "上海") == 0.0
    # Partial: the prediction's jieba words are a strict subset of the gold's.
    words_pred = [w for w in (normalize_zh_answer(t) for t in m.jieba_cut("财政总收入增长了")) if w]
    words_gold = [w for w in (normalize_zh_answer(t) for t in m.jieba_cut("铜仁市的财政总收入增长了25.89%")) if w]
    expected = f1_tokens(words_pred, words_gold)
    assert 0.0 < expected < 1.0
    assert qa_f1_zh_score("财政总收入增长了", "铜仁市的财政总收入增长了25.89%") == pytest.approx(expected)


def test_rouge_l_known_pair():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each way: F = 5/6.
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_score("The Cat, sat!", "the cat sat") == pytest.approx(1.0)  # default tokenizer: lowercase, alnum
    assert rouge_score("", "anything") == 0.0
    assert rouge_score("dog", "cat") == 0.0


def test_rouge_zh_uses_jieba_words():
    assert rouge_zh_score("体验服是逆战拿来测试新模式的。", "体验服是逆战拿来测试新模式的。") == pytest.approx(1.0)
    assert rouge_zh_score("完全不同", "体验服是逆战") == 0.0
    score = rouge_zh_score("体验服是用来测试的", "体验服是逆战拿来测试新模式的")
    assert 0.0 < score < 1.0


def test_classification_gold_among_mentioned_classes():
    classes = ["Date", "Reason", "Other location", "location", "Manner of an action"]
    assert classification_score("Date", "Date", all_classes=classes) == 1.0
    assert classification_score("Date or Reason", "Date", all_classes=classes) == 0.5
    assert classification_score("Reason", "Date", all_classes=classes) == 0.0
    assert classification_score("nothing known", "Date", all_classes=classes) == 0.0
    # "location" is a proper substring of the gold label and does not count against it.
    assert classification_score("Other location", "Other location", all_classes=classes) == 1.0
    with pytest.raises(NammError, match="all_classes"):
        classification_score("Date", "Date")


def test_retrieval_extracts_paragraph_numbers():
    assert retrieval_score("Paragraph 19", "Paragraph 19") == 1.0
    assert retrieval_score("The answer is Paragraph 19.", "Paragraph 19") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 19", "Paragraph 19") == 0.5
    assert retrieval_score("Paragraph 1", "Paragraph 19") == 0.0  # whole numbers, not digit prefixes
    assert retrieval_score("no idea", "Paragraph 19") == 0.0
    assert retrieval_zh_score("段落5", "段落5") == 1.0
    assert retrieval_zh_score("答案是段落5和段落7", "段落5") == 0.5


def test_count_score_fraction_of_numbers():
    assert count_score("8", "8") == 1.0
    assert count_score("There are 8 unique paragraphs, not 9", "8") == 0.5
    assert count_score("eight", "8") == 0.0


def test_code_similarity_uses_first_non_comment_line():
    gold = "            if e.text == language:"
    pred = "```python\n# look for the language\n            if e.text == language:\n                return e\n"
    assert code_sim_score(pred, gold) == 1.0
    assert code_sim_score("\n\n// C comment\n" + gold, gold) == 1.0
    # Scoring the comment line instead would give much less.
    assert code_sim_score("# look for the language", gold) < 0.2
    from rapidfuzz import fuzz

    assert code_sim_score("if e.text == lang:", gold) == pytest.approx(fuzz.ratio("if e.text == lang:", gold) / 100)


def test_first_line_rule():
    assert first_line("\n\nDate\nQuestion: next") == "Date"
    assert first_line("") == ""


def test_ruler_and_infinitebench_matches():
    assert string_match_all("Values: 123 and 456", ["123", "456"]) == 1.0
    assert string_match_all("Values: 123", ["123", "456"]) == 0.5
    assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)  # case-insensitive
    assert string_match_all("anything", []) == 0.0
    assert string_match_part("only 456 here", ["123", "456"]) == 1.0
    assert string_match_part("none", ["123", "456"]) == 0.0
    assert contains_score(" 12345. Remember", "12345") == 1.0
    assert contains_score("1234", "12345") == 0.0
    assert contains_score("anything", "") == 0.0


def test_metric_table_is_complete():
    assert set(m.LONGBENCH_METRICS) == {"qa_f1", "qa_f1_zh", "rouge", "rouge_zh", "classification", "retrieval",
                                        "retrieval_zh", "count", "code_sim"}
