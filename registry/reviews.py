"""The rules over reviews, pure like ``gate.py``: which review of a request counts, the failure
categories per version, and the preference rate of a blind pairwise round with its interval.

The console writes reviews and votes through the ``Registry``; the flywheel's dataset builder, the
drift report and the eval report page read what these functions make of them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from loraflow.registry.domain import PairwiseVoteInfo, ReviewInfo

# The two-sided 95% normal quantile, for the Wilson interval.
_Z95 = 1.959963984540054


def current_reviews(reviews: Iterable[ReviewInfo]) -> dict[str, ReviewInfo]:
    """The review that counts for each request: its latest (every review stays stored and audited)."""
    latest: dict[str, ReviewInfo] = {}
    for review in sorted(reviews, key=lambda r: r.id):
        latest[review.request_id] = review
    return latest


def category_summary(reviews: Iterable[ReviewInfo]) -> dict[int, dict[str, int]]:
    """Per version, how many of its reviewed requests carry each failure category (current reviews
    only), most frequent first; a version whose reviews tag nothing maps to ``{}``."""
    counts: dict[int, Counter[str]] = {}
    for review in current_reviews(reviews).values():
        counts.setdefault(review.version, Counter()).update(review.categories)
    return {version: dict(c.most_common()) for version, c in sorted(counts.items())}


def reviewed_counts(reviews: Iterable[ReviewInfo]) -> dict[int, dict[str, int]]:
    """Per version: requests reviewed, rated up, rated down and corrected (current reviews only)."""
    out: dict[int, dict[str, int]] = {}
    for review in current_reviews(reviews).values():
        row = out.setdefault(review.version, {"reviewed": 0, "positive": 0, "negative": 0, "corrected": 0})
        row["reviewed"] += 1
        row["positive"] += review.rating is not None and review.rating > 0
        row["negative"] += review.rating is not None and review.rating < 0
        row["corrected"] += review.correction is not None
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Preference:
    """How often reviewers preferred the candidate's answer in a blind pairwise round: a tie counts
    half to each side. The interval is Wilson's score interval at 95% over the votes (ties as
    halves), which stays inside [0, 1] and is honest on a few dozen votes."""

    candidate: int
    baseline: int
    ties: int

    @property
    def n(self) -> int:
        return self.candidate + self.baseline + self.ties

    @property
    def rate(self) -> float | None:
        return (self.candidate + self.ties / 2) / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        if not self.n or self.rate is None:
            return None
        n, p, z2 = self.n, self.rate, _Z95**2
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return (max(0.0, centre - half), min(1.0, centre + half))

    def to_json(self) -> dict[str, object]:
        return {
            "candidate": self.candidate,
            "baseline": self.baseline,
            "ties": self.ties,
            "n": self.n,
            "rate": self.rate,
            "ci": list(self.interval) if self.interval else None,
        }


def preference(votes: Iterable[PairwiseVoteInfo]) -> Preference:
    counts = Counter(v.choice for v in votes)
    return Preference(candidate=counts["candidate"], baseline=counts["baseline"], ties=counts["tie"])
