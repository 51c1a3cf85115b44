"""The scorers and the paired bootstrap, on hand-made generations."""

from __future__ import annotations

import pytest

from loraflow.registry.errors import InvalidArgumentError
from loraflow.trainer.eval.judge import parse_verdict
from loraflow.trainer.eval.scoring import (
    Bootstrap,
    Generation,
    Reference,
    ScoredSystem,
    Task,
    answer_match,
    exact_match,
    token_f1,
)

pytestmark = pytest.mark.unit


def gen(text: str, finish: str = "stop", tokens: int = 3, latency: float = 0.1) -> Generation:
    return Generation(text=text, finish_reason=finish, output_tokens=tokens, latency_s=latency)


def test_exact_match_compares_json_by_value_and_text_by_collapsed_whitespace() -> None:
    assert exact_match('{"a": 1, "b": 2}', '{"b":2,"a":1}') == 1.0
    assert exact_match('{"a": 1}', '{"a": 2}') == 0.0
    assert exact_match("hello   world ", "hello world") == 1.0
    assert exact_match("Hello world", "hello world") == 0.0


def test_token_f1() -> None:
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("cat", "the cat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("dog", "the cat") == 0.0
    assert token_f1("", "") == 1.0


def test_answer_match_finds_the_reference_in_the_first_sentence_only() -> None:
    assert answer_match("The capital of France is Paris.", "Paris") == 1.0
    assert answer_match("2 + 3 = 5", "5") == 1.0
    assert answer_match("The largest mammal is the Blue Whale. It is big.", "blue whale") == 1.0
    assert answer_match("The boiling point is about 100.0 degrees.", "100") == 1.0  # "100.0" ends nothing
    assert answer_match("A year has 365 days. So 12 months.", "12") == 0.0  # said later, not first
    assert answer_match("No, 9 is not an even number.", "no") == 1.0
    assert answer_match("Nothing here", "no") == 0.0  # words, not substrings
    assert answer_match("It is 15.", "5") == 0.0
    assert answer_match("whale blue", "blue whale") == 0.0  # in order and adjacent


def test_task_inference_picks_metrics_from_the_references() -> None:
    json_task = Task.infer([Reference('{"a": 1}'), Reference("[1]")])
    assert json_task.json and "json_valid" in json_task.metrics and "label_accuracy" not in json_task.metrics
    labels = Task.infer([Reference("order", label="order"), Reference("return", label="return")])
    assert labels.labels and labels.primary_default == "label_macro_f1"
    assert "json_valid" not in labels.metrics
    text = Task.infer([Reference("hello", label="greeting")])  # a label that is not the answer
    assert not text.labels and text.primary_default == "exact_match"
    assert "answer_match" not in text.metrics  # only when named
    assert Task.infer([Reference("x")], metrics=["answer_match"]).metrics == ("answer_match",)
    with pytest.raises(InvalidArgumentError) as info:
        Task.infer([Reference("x")], metrics=["exact_match", "bleu"])
    assert info.value.param == "eval.metrics" and "bleu" in info.value.message


def test_scores_per_example() -> None:
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    task = Task.infer([Reference('{"name": "ann"}')], schema=schema)
    s = task.score(Reference('{"name": "ann"}'), gen('{"name": "bob"}', finish="length", tokens=7))
    assert s["exact_match"] == 0.0 and s["json_valid"] == 1.0 and s["schema_valid"] == 1.0
    assert s["stop_rate"] == 0.0 and s["output_tokens"] == 7.0 and s["latency_s"] == 0.1
    assert 0 < s["rouge_l"] < 1  # type: ignore[operator]
    bad = task.score(Reference('{"name": "ann"}'), gen('{"nom": 3}'))
    assert bad["json_valid"] == 1.0 and bad["schema_valid"] == 0.0
    assert task.score(Reference('{"name": "ann"}'), gen("7"))["json_valid"] == 0.0  # a bare scalar is not


def test_macro_f1_is_over_the_set_not_a_mean_of_examples() -> None:
    refs = [Reference(x, label=x) for x in ["a", "a", "a", "b"]]
    system = ScoredSystem(Task.infer(refs), refs, [gen("a")] * 4)  # always "a"
    means = system.means()
    assert means["label_accuracy"] == 0.75
    # class a: P=3/4 R=1 F1=6/7; class b: F1=0 -> macro 3/7
    assert means["label_macro_f1"] == pytest.approx(3 / 7, abs=1e-4)


def test_paired_bootstrap_separates_a_real_gain_from_noise() -> None:
    refs = [Reference(f"answer {i}") for i in range(40)]
    task = Task.infer(refs, metrics=["exact_match"])
    good = ScoredSystem(task, refs, [gen(r.text) if i % 10 else gen("x") for i, r in enumerate(refs)])
    bad = ScoredSystem(task, refs, [gen("x") if i % 10 else gen(r.text) for i, r in enumerate(refs)])
    boot = Bootstrap(samples=500, seed=1)
    gain = boot.compare(good, bad)["exact_match"]
    assert gain["diff"] == pytest.approx(0.8) and gain["ci"][0] > 0.5
    # Two systems that differ on 2 of 40 examples, one each way: no win, and the interval straddles 0.
    a = ScoredSystem(task, refs, [gen("x") if i == 0 else gen(r.text) for i, r in enumerate(refs)])
    b = ScoredSystem(task, refs, [gen("x") if i == 1 else gen(r.text) for i, r in enumerate(refs)])
    noise = boot.compare(a, b)["exact_match"]
    assert noise["diff"] == 0.0 and noise["ci"][0] < 0 < noise["ci"][1]
    summary = boot.summary(good)["exact_match"]
    assert summary["mean"] == 0.9 and summary["ci"][0] < 0.9 < summary["ci"][1]


def test_bootstrap_of_values_with_gaps() -> None:
    boot = Bootstrap(samples=200)
    assert boot.mean([None, None]) == {"mean": None, "ci": None}
    assert boot.mean([1.0, None, 0.0])["mean"] == 0.5
    assert boot.paired([1.0, None, 1.0], [0.0, 1.0, None]) == {"diff": 1.0, "ci": [1.0, 1.0]}


def test_judge_replies_are_parsed_and_kept_when_unusable() -> None:
    v = parse_verdict('Sure. {"reasoning": "right city", "score": 4}', min_score=1, max_score=5)
    assert v.score == 0.75 and v.reasoning == "right city"
    assert parse_verdict("garbage", min_score=1, max_score=5).score is None
    out_of_range = parse_verdict('{"score": 9, "reasoning": "?"}', min_score=1, max_score=5)
    assert out_of_range.score is None and out_of_range.reasoning == "?"
