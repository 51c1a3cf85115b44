"""Drift figures and verdicts, in pure Python (no torch, no numpy): the ground floor both sides use.
The gateway computes them on every request (``loraflow.server.traffic.live``); ``data prepare``
records the reference histograms; ``loraflow drift`` (``loraflow.trainer.drift``) turns a window
of sampled traffic into a stored report.

- :class:`Profile`: what a training split looks like, recorded with its dataset version by
  ``data prepare`` and the flywheel, read by the gateway and ``loraflow drift``; the one
  owner of that schema.
- :class:`Histogram`: the reference distribution of a length, as quantile bins of the
  training split (a profile's ``lengths``).
- :func:`psi`: the population stability index of live values against it. The usual reading:
  below 0.1 stable, 0.1 to 0.25 worth watching, above 0.25 act.
- :func:`json_valid`, :func:`is_refusal_or_empty`: per-answer checks; :func:`answer` records
  both, with the token counts, for one answer.
- :func:`window_figures`: the figures of a window of answers and ratings against a profile.
- :func:`verdict`: ``ok`` / ``watch`` / ``act`` from a value and its two thresholds.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

Verdict = Literal["ok", "watch", "act", "unknown"]

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')t|i cannot|i'?m (unable|not able)|"
    r"i am (unable|not able)|i won'?t|as an ai\b)",
    re.IGNORECASE,
)
_EPS = 1e-4  # floor on a bin's share, so an empty bin on one side gives a large but finite PSI


@dataclass(frozen=True)
class Histogram:
    """Bins ``(-inf, e0], (e0, e1], ..., (e_last, +inf)`` with each bin's share: a value v falls in bin
    ``bisect_left(edges, v)``. The last edge is the reference's maximum, so values beyond anything
    seen in training land in a bin of their own (share 0 in the reference)."""

    edges: list[float]
    shares: list[float]
    n: int

    @classmethod
    def from_values(cls, values: Sequence[float], bins: int = 10) -> Histogram:
        """Cut at the quantiles of ``values`` (ties merged: a reference with one value has the bins
        ``<= v`` and ``> v``), so each bin holds about 1/bins of them."""
        if not values:
            raise ValueError("a histogram needs at least one value")
        ordered = sorted(values)
        n = len(ordered)
        edges = [
            float(c)
            for c in sorted({ordered[max(0, math.ceil(n * i / bins) - 1)] for i in range(1, bins + 1)})
        ]
        return cls(edges=edges, shares=[round(x, 6) for x in shares(edges, ordered)], n=n)


class TokenStats(BaseModel):
    """Tokens per example (prompt and answer, as the base's tokenizer counts them)."""

    model_config = ConfigDict(frozen=True)

    total: int = 0
    min: int | None = None
    p50: int | None = None
    p90: int | None = None
    p99: int | None = None
    max: int | None = None
    mean: float | None = None


class FormatProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    json_share: float | None = None  # the share of answers that parse as JSON


class EmbeddingProfile(BaseModel):
    """Centroid and spread of the split's prompts embedded by ``model``."""

    model_config = ConfigDict(frozen=True)

    model: str
    dim: int
    n: int
    centroid: list[float]
    cosine_to_centroid: dict[str, float] = {}  # mean, std, p10, p50, p90


class Profile(BaseModel):
    """A training split's profile, what drift is measured against. Every field is optional, and
    keys of older profiles are kept as they were (``extra``), so a dataset prepared by any
    release still reads; its JSON leaves out what was not recorded."""

    model_config = ConfigDict(frozen=True, extra="allow")

    tokens: TokenStats | None = None
    lengths: dict[str, Histogram] = {}  # "prompt_tokens", "output_tokens": as the engine counts them
    format: FormatProfile | None = None
    embedding: EmbeddingProfile | None = None

    @property
    def json_share(self) -> float | None:
        return self.format.json_share if self.format else None

    @model_serializer(mode="wrap")
    def _recorded_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None and v != {}}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def shares(edges: Sequence[float], values: Sequence[float]) -> list[float]:
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect.bisect_left(edges, v)] += 1
    total = len(values) or 1
    return [c / total for c in counts]


def psi(reference: Histogram, live: Sequence[float]) -> float:
    """Population stability index of ``live`` against ``reference``: sum of (l - r) * ln(l / r) over bins."""
    observed = shares(reference.edges, live)
    total = 0.0
    for r, o in zip(reference.shares, observed, strict=True):
        r, o = max(r, _EPS), max(o, _EPS)
        total += (o - r) * math.log(o / r)
    return total


def json_valid(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False
    return True


def is_refusal_or_empty(text: str) -> bool:
    return not text.strip() or bool(_REFUSAL.match(text))


def verdict(value: float | None, watch: float, act: float) -> Verdict:
    """Higher is worse: ``act`` at or past ``act``, ``watch`` at or past ``watch``."""
    if value is None or math.isnan(value):
        return "unknown"
    if value >= act:
        return "act"
    if value >= watch:
        return "watch"
    return "ok"


@dataclass(frozen=True)
class Answer:
    at: float
    prompt_tokens: int | None
    output_tokens: int | None
    json_ok: bool
    refusal: bool


def window_figures(
    rows: list[Answer], ratings: list[int], profile: Profile | None
) -> dict[str, float | None]:
    """PSI of prompt and output lengths against the profile, format validity, refusal and
    negative-feedback rates. Each is None where it cannot be computed."""
    lengths = profile.lengths if profile else {}
    figures: dict[str, float | None] = {"requests": float(len(rows))}
    for feature in ("prompt_tokens", "output_tokens"):
        values = [getattr(r, feature) for r in rows if getattr(r, feature) is not None]
        ref = lengths.get(feature)
        figures[f"psi_{feature}"] = psi(ref, values) if ref and values else None
    figures["format_valid_rate"] = sum(r.json_ok for r in rows) / len(rows) if rows else None
    figures["refusal_rate"] = sum(r.refusal for r in rows) / len(rows) if rows else None
    figures["negative_feedback_rate"] = sum(1 for r in ratings if r < 0) / len(ratings) if ratings else None
    figures["feedback"] = float(len(ratings))
    return figures


def answer(text: str, usage: dict[str, Any] | None, *, at: float) -> Answer:
    usage = usage or {}
    return Answer(
        at=at,
        prompt_tokens=usage.get("prompt_tokens"),
        output_tokens=usage.get("completion_tokens"),
        json_ok=json_valid(text),
        refusal=is_refusal_or_empty(text),
    )


def figure_verdict(verdicts: Mapping[str, str], figure: str) -> str:
    """The verdict a drift report gives ``figure`` ("" if none): its own, or for the embedding
    figures (centroid distance, MMD and its p-value) the one verdict they share, ``embedding``."""
    if figure in verdicts:
        return verdicts[figure]
    return verdicts.get("embedding", "") if figure.startswith("embedding") else ""
