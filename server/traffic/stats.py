"""Cheap drift figures, in pure Python: the gateway computes them on every request (no torch, no numpy).

- :class:`Histogram`: the reference distribution of a length, as quantile bins of the
  training split (recorded in the dataset profile by ``data prepare``).
- :func:`psi`: the population stability index of live values against it. The usual reading:
  below 0.1 stable, 0.1 to 0.25 worth watching, above 0.25 act.
- :func:`json_valid`, :func:`is_refusal_or_empty`: per-answer checks.
- :func:`verdict`: ``ok`` / ``watch`` / ``act`` from a value and its two thresholds.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
        return cls(edges=edges, shares=shares(edges, ordered), n=n)

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges, "shares": [round(s, 6) for s in self.shares], "n": self.n}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        return cls(
            edges=[float(e) for e in data["edges"]], shares=[float(s) for s in data["shares"]], n=data["n"]
        )


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
