"""The one scoring module: what a generated answer is worth against its reference.

Training's end-of-run evaluation (PEFT ``generate``) and ``loraflow eval`` (vLLM
through the gateway) both hand their generations to :class:`ScoredSystem`, so a
number means the same thing wherever it was measured.

Per example:

- ``exact_match``: the output equals the reference after whitespace is collapsed;
  when both parse as JSON, the parsed values are compared instead of the text
- ``token_f1``: SQuAD-style bag-of-words F1 over lowercase word tokens
- ``answer_match``: the reference's words appear, adjacent and in order, in the
  answer's first sentence ("The capital of France is Paris." matches "Paris").
  For short factual answers from a chat model that answers in sentences. Only
  when named: the built-in regression suite uses it
- ``rouge_l``: ROUGE-L F-measure from Google's ``rouge-score``
- ``json_valid``: the output parses as a JSON object or array (tasks whose
  references are JSON; a bare number or string does not count)
- ``schema_valid``: the output validates against the configured JSON schema
- ``label_accuracy``: the output is the example's label (classification tasks,
  where every reference *is* its label); ``label_macro_f1`` is over the set
- ``stop_rate``: the model ended the answer itself (``finish_reason == "stop"``)
- ``output_tokens`` and ``latency_s``: cost, reported but never "better"

Intervals are percentile bootstraps over the examples. Comparisons are *paired*:
both systems are resampled with the same indices, so the interval is on the
difference itself, and a difference within the noise of a small test set shows
an interval that straddles zero.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError

MetricName = Literal[
    "exact_match",
    "token_f1",
    "answer_match",
    "rouge_l",
    "json_valid",
    "schema_valid",
    "label_accuracy",
    "label_macro_f1",
    "stop_rate",
    "output_tokens",
    "latency_s",
]
ALL_METRICS: tuple[MetricName, ...] = get_args(MetricName)  # in display order
# True: higher is better; False: lower is better; None: neither (reported, never gated on direction).
_NEITHER: dict[str, bool | None] = {"output_tokens": None, "latency_s": False}
HIGHER_IS_BETTER: dict[str, bool | None] = {m: _NEITHER.get(m, True) for m in ALL_METRICS}
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")  # "3.5" does not end one
_ONLY_WHEN_NAMED = ("answer_match",)


@dataclass(frozen=True)
class Generation:
    """One answer from one system: what it said, why it stopped, and what it cost."""

    text: str
    finish_reason: str | None
    output_tokens: int | None = None
    latency_s: float | None = None


@dataclass(frozen=True)
class Reference:
    """The expected answer of one example, and its class label when the data carry one."""

    text: str
    label: str | None = None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return _NOT_JSON


_NOT_JSON = object()


def _norm(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_match(output: str, reference: str) -> float:
    a, b = _parse_json(output), _parse_json(reference)
    if a is not _NOT_JSON and b is not _NOT_JSON:
        return float(a == b)
    return float(_norm(output) == _norm(reference))


def answer_match(output: str, reference: str) -> float:
    """1.0 when the reference's word tokens occur as a contiguous run in the output's first sentence.

    Only the first sentence counts, so an answer that states something else and mentions the
    reference later ("A year has 365 days. ... 12 ...") does not match."""
    first = _SENTENCE_END.split(output.strip(), maxsplit=1)[0]
    pred, gold = _tokens(first), _tokens(reference)
    if not gold:
        return float(not pred)
    return float(any(pred[i : i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1)))


def token_f1(output: str, reference: str) -> float:
    pred, gold = _tokens(output), _tokens(reference)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Task:
    """Which metrics apply, inferred from the references unless the config names them."""

    metrics: tuple[MetricName, ...]
    json: bool = False
    labels: bool = False
    schema: dict[str, Any] | None = None
    _rouge: Any = field(default=None, repr=False)

    @classmethod
    def infer(
        cls,
        references: Sequence[Reference],
        *,
        schema: dict[str, Any] | None = None,
        metrics: Sequence[str] | None = None,
    ) -> Task:
        is_json = bool(references) and all(isinstance(_parse_json(r.text), dict | list) for r in references)
        has_labels = bool(references) and all(
            r.label is not None and _norm(r.text) == _norm(r.label) for r in references
        )
        if metrics is not None:
            unknown = sorted(set(metrics) - set(ALL_METRICS))
            if unknown:
                raise InvalidArgumentError(
                    f"eval.metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(ALL_METRICS)}",
                    param="eval.metrics",
                )
            if "schema_valid" in metrics and schema is None:
                raise InvalidArgumentError(
                    "eval.metrics names schema_valid but no JSON schema is configured (eval.json_schemas)",
                    param="eval.metrics",
                )
            chosen = tuple(m for m in ALL_METRICS if m in metrics)
        else:
            chosen = tuple(
                m
                for m in ALL_METRICS
                if m not in _ONLY_WHEN_NAMED
                and not (m == "json_valid" and not is_json)
                and not (m == "schema_valid" and schema is None)
                and not (m in ("label_accuracy", "label_macro_f1") and not has_labels)
            )
        task = cls(metrics=chosen, json=is_json, labels=has_labels, schema=schema)
        if "rouge_l" in chosen:
            try:
                from rouge_score import rouge_scorer
            except ImportError as exc:
                raise MissingDependencyError("ROUGE-L needs pip install 'loraflow[eval]'") from exc
            task._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        if schema is not None:
            try:
                import jsonschema
            except ImportError as exc:
                raise MissingDependencyError("JSON schema checks need pip install 'loraflow[eval]'") from exc
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise InvalidArgumentError(
                    f"the JSON schema is invalid: {exc.message}", param="schema"
                ) from exc
        return task

    @property
    def primary_default(self) -> MetricName:
        """The metric a gate uses when the config names none."""
        if self.labels:
            return "label_macro_f1"
        return "exact_match"

    def score(self, reference: Reference, generation: Generation) -> dict[str, float | None]:
        out, ref = generation.text.strip(), reference.text.strip()
        scores: dict[str, float | None] = {}
        for metric in self.metrics:
            value: float | None
            if metric == "exact_match":
                value = exact_match(out, ref)
            elif metric == "token_f1":
                value = token_f1(out, ref)
            elif metric == "answer_match":
                value = answer_match(out, ref)
            elif metric == "rouge_l":
                value = float(self._rouge.score(ref, out)["rougeL"].fmeasure)
            elif metric == "json_valid":
                value = float(isinstance(_parse_json(out), dict | list))
            elif metric == "schema_valid":
                value = self._schema_valid(out)
            elif metric in ("label_accuracy", "label_macro_f1"):
                value = float(reference.label is not None and _norm(out) == _norm(reference.label))
            elif metric == "stop_rate":
                value = float(generation.finish_reason == "stop")
            elif metric == "output_tokens":
                value = float(generation.output_tokens) if generation.output_tokens is not None else None
            else:  # latency_s
                value = generation.latency_s
            scores[metric] = value
        return scores

    def _schema_valid(self, output: str) -> float:
        import jsonschema

        value = _parse_json(output)
        if value is _NOT_JSON:
            return 0.0
        return float(jsonschema.Draft202012Validator(self.schema).is_valid(value))


class ScoredSystem:
    """One system's generations on the examples, scored; the statistics the report and gate use."""

    def __init__(self, task: Task, references: Sequence[Reference], generations: Sequence[Generation]):
        if len(references) != len(generations):
            raise ValueError("one generation per reference")
        import numpy as np

        self.task = task
        self.references = list(references)
        self.generations = list(generations)
        self.scores = [task.score(r, g) for r, g in zip(references, generations, strict=True)]
        self._columns: dict[str, Any] = {
            m: np.array([np.nan if s[m] is None else s[m] for s in self.scores], dtype=float)
            for m in task.metrics
        }
        if task.labels:
            classes = sorted({r.label or "" for r in self.references})
            index = {c: i for i, c in enumerate(classes)}
            self._gold = np.array([index[r.label or ""] for r in self.references])
            # A prediction outside the classes is its own wrong class (-1).
            self._pred = np.array([index.get(_norm(g.text.strip()), -1) for g in self.generations])
            self._classes = len(classes)

    def __len__(self) -> int:
        return len(self.references)

    def statistic(self, metric: str, idx: Any) -> Any:
        """The metric over the examples ``idx`` (shape (B, n)): an array of B values (nan if none apply)."""
        import numpy as np

        if metric == "label_macro_f1":
            return np.array([self._macro_f1(row) for row in idx])
        column = self._columns[metric][idx]
        with np.errstate(invalid="ignore"):
            counts = (~np.isnan(column)).sum(axis=1)
            sums = np.nansum(column, axis=1)
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def _macro_f1(self, rows: Any) -> float:
        gold, pred = self._gold[rows], self._pred[rows]
        f1s = []
        for c in range(self._classes):
            tp = int(((pred == c) & (gold == c)).sum())
            fp = int(((pred == c) & (gold != c)).sum())
            fn = int(((pred != c) & (gold == c)).sum())
            if tp + fp + fn == 0:
                continue  # the class is absent from this resample
            f1s.append(2 * tp / (2 * tp + fp + fn))
        return sum(f1s) / len(f1s) if f1s else float("nan")

    def means(self) -> dict[str, float | None]:
        import numpy as np

        whole = np.arange(len(self))[None, :]
        return {m: _round(float(self.statistic(m, whole)[0])) for m in self.task.metrics}


@dataclass(frozen=True)
class Bootstrap:
    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def _indices(self, n: int) -> Any:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        return rng.integers(0, n, size=(self.samples, n))

    def _interval(self, values: Any) -> list[float] | None:
        import numpy as np

        values = values[~np.isnan(values)]
        if values.size == 0:
            return None
        tail = (1 - self.confidence) / 2 * 100
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return [round(float(lo), 4), round(float(hi), 4)]

    def summary(self, system: ScoredSystem) -> dict[str, dict[str, Any]]:
        """{metric: {"mean", "ci"}} for one system."""
        means = system.means()
        if not len(system):
            return {m: {"mean": None, "ci": None} for m in system.task.metrics}
        idx = self._indices(len(system))
        return {
            m: {"mean": means[m], "ci": self._interval(system.statistic(m, idx))} for m in system.task.metrics
        }

    def compare(self, a: ScoredSystem, b: ScoredSystem) -> dict[str, dict[str, Any]]:
        """{metric: {"diff", "ci"}}: ``a`` minus ``b`` on the same examples, paired resampling."""
        if len(a) != len(b):
            raise ValueError("paired comparison needs the same examples")
        if not len(a):
            return {m: {"diff": None, "ci": None} for m in a.task.metrics}
        import numpy as np

        whole = np.arange(len(a))[None, :]
        idx = self._indices(len(a))
        out: dict[str, dict[str, Any]] = {}
        for m in a.task.metrics:
            point = float(a.statistic(m, whole)[0] - b.statistic(m, whole)[0])
            out[m] = {
                "diff": _round(point),
                "ci": self._interval(a.statistic(m, idx) - b.statistic(m, idx)),
            }
        return out

    def mean(self, values: Sequence[float | None]) -> dict[str, Any]:
        """{"mean", "ci"} of per-example values; None (unscored) examples are left out."""
        import numpy as np

        column = np.array([np.nan if v is None else v for v in values], dtype=float)
        if column.size == 0 or np.isnan(column).all():
            return {"mean": None, "ci": None}
        sample = column[self._indices(column.size)]
        counts = (~np.isnan(sample)).sum(axis=1)
        resampled = np.where(counts > 0, np.nansum(sample, axis=1) / np.maximum(counts, 1), np.nan)
        return {"mean": _round(float(np.nanmean(column))), "ci": self._interval(resampled)}

    def paired(self, a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
        """{"diff", "ci"}: mean of a minus b over the examples both have, paired resampling."""
        import numpy as np

        pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
        if not pairs:
            return {"diff": None, "ci": None}
        d = np.array([x - y for x, y in pairs], dtype=float)
        resampled = d[self._indices(d.size)].mean(axis=1)
        return {"diff": _round(float(d.mean())), "ci": self._interval(resampled)}


def _round(value: float) -> float | None:
    return None if value != value else round(value, 4)  # nan -> None
